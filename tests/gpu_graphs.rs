//! Decode steps replayed from CUDA graphs (`tessera_worker::graphs`) on every fixture: a batch
//! of three copies of each of a fixture's prompts decoding together (padded to a batch bucket,
//! and shrinking through smaller buckets as copies stop early) gives transformers' greedy
//! tokens, the expert counts of the same steps run eagerly, and one graph launch per replayed
//! step.
//!
//! Skipped with a visible message where there is no GPU; CI runs it on the CPU emulator of the
//! CUDA libraries (`tests/cuda-emulator`), whose graphs refill graph-owned memory with 0xff bytes
//! before every launch, so a replay that reads anything its capture did not write fails here.

mod common;

use std::sync::atomic::Ordering;

use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cuda::CudaBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::executor::{Executor, SeqStep, StepResult};
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::model::Model;
use tessera_worker::sampling::SamplingParams;

/// |Δ logprob| allowed on the GPU (the bound and its reasons are `tests/gpu.rs`'s).
const GPU_LOGPROB_TOLERANCE: f32 = 1e-1;

/// What one run of a fixture's batch produced.
#[derive(Default)]
struct Run {
    tokens: Vec<Vec<u32>>,
    logprobs: Vec<Vec<f32>>,
    /// Expert counts of every decode step, in order.
    counts: Vec<Vec<(usize, Vec<u32>)>>,
    /// Launches of every decode step, in order.
    launches: Vec<u64>,
}

/// Copies of each case's prompt.
const COPIES: usize = 3;

/// Each sequence's prompt prefilled alone, then every unfinished sequence decoding in one step,
/// on an executor replaying decode steps from graphs when `graphs` is set. Sequence `k` is a copy
/// of case `k % cases`; copy `c` stops `3c` tokens short of the case's greedy tokens, so that
/// (with the fixtures' three cases of eight tokens) the batch is 9 sequences for a step (past
/// the largest bucket, 8: eager), then 6 for three steps (bucket 8) and 3 for three (bucket 4).
fn run(dir: &std::path::Path, graphs: bool) -> (Run, tessera_worker::graphs::GraphStats) {
    let reference = common::reference(dir);
    let gpu = CudaBackend::new(0).expect("device 0 opens");
    let counter = gpu.launch_counter();
    let model = Model::load(
        gpu,
        load_model_spec(dir).unwrap(),
        &Checkpoint::open(dir).unwrap(),
        &ShardSpec::whole(),
    )
    .unwrap();
    let (num_blocks, block_size) = (256, 4);
    let mut exec = Executor::new(model, num_blocks, block_size).unwrap();
    exec.enable_graphs(if graphs { 8 } else { 0 });
    let mut alloc = BlockAllocator::new(num_blocks, block_size);
    let cases: Vec<&common::Case> = (0..COPIES).flat_map(|_| reference.cases.iter()).collect();
    let wanted: Vec<usize> = (0..cases.len())
        .map(|k| {
            let copy = k / reference.cases.len();
            cases[k].greedy_ids.len().saturating_sub(3 * copy).max(1)
        })
        .collect();
    let blocks: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            alloc
                .allocate(alloc.blocks_for(c.prompt_ids.len() + c.greedy_ids.len()))
                .unwrap()
        })
        .collect();
    let mut out = Run {
        tokens: vec![Vec::new(); cases.len()],
        logprobs: vec![Vec::new(); cases.len()],
        ..Run::default()
    };
    let step = |seq: usize, tokens: Vec<u32>, context_len: usize| SeqStep {
        seq_id: seq as u64,
        tokens,
        context_len,
        block_table: blocks[seq].clone(),
        sampling: SamplingParams::greedy(),
        top_logprobs: 0,
        prompt_logprobs: false,
        sample: true,
        prompt_len: cases[seq].prompt_ids.len(),
    };
    let record = |out: &mut Run, batch: &[SeqStep], result: StepResult| {
        for (s, r) in batch.iter().zip(result.results) {
            let i = s.seq_id as usize;
            out.tokens[i].push(r.token.expect("every step samples"));
            out.logprobs[i].push(r.logprob);
        }
    };
    for (i, c) in cases.iter().enumerate() {
        let batch = [step(i, c.prompt_ids.clone(), c.prompt_ids.len())];
        let result = exec.step(&batch).unwrap();
        record(&mut out, &batch, result);
    }
    loop {
        let batch: Vec<SeqStep> = (0..cases.len())
            .filter(|&i| out.tokens[i].len() < wanted[i])
            .map(|i| {
                let context = cases[i].prompt_ids.len() + out.tokens[i].len();
                step(i, vec![*out.tokens[i].last().unwrap()], context)
            })
            .collect();
        if batch.is_empty() {
            break;
        }
        let before = counter.load(Ordering::Relaxed);
        let result = exec.step(&batch).unwrap();
        out.launches.push(counter.load(Ordering::Relaxed) - before);
        out.counts.push(result.expert_counts.clone());
        record(&mut out, &batch, result);
    }
    (out, exec.graph_stats())
}

#[test]
fn decode_graphs_give_transformers_tokens_and_the_eager_counts() {
    let test = "decode_graphs_give_transformers_tokens_and_the_eager_counts";
    match CudaBackend::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return eprintln!("SKIPPED: {test}: the driver reports no CUDA device"),
        Err(e) => return eprintln!("SKIPPED: {test}: {e}"),
    }
    let mut failures = Vec::new();
    for (name, dir) in common::fixtures() {
        let reference = common::reference(&dir);
        let (graphed, stats) = run(&dir, true);
        let (eager, eager_stats) = run(&dir, false);
        assert_eq!(eager_stats.replays, 0, "{name}: graphs were off");
        let cases = (0..COPIES).flat_map(|_| reference.cases.iter());
        for (i, case) in cases.enumerate() {
            let n = graphed.tokens[i].len();
            if graphed.tokens[i] != case.greedy_ids[..n] {
                failures.push(format!(
                    "{name} case {i}: tokens {:?} != {:?} (closest margin {:.3})",
                    graphed.tokens[i],
                    &case.greedy_ids[..n],
                    case.min_margin
                ));
                continue;
            }
            let worst = graphed.logprobs[i]
                .iter()
                .zip(&case.greedy_logprobs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if worst > GPU_LOGPROB_TOLERANCE {
                failures.push(format!("{name} case {i}: max |Δ logprob| {worst:.2e}"));
            }
        }
        // Padding rows count towards no expert: the counts are the eager steps' exactly.
        if graphed.counts != eager.counts {
            failures.push(format!(
                "{name}: expert counts differ from the eager steps'"
            ));
        }
        let decode_steps = graphed.launches.len() as u64;
        eprintln!(
            "{name}: {stats:?} over {decode_steps} decode steps; launches graphed {:?}, eager {:?}",
            graphed.launches, eager.launches
        );
        // Each bucket's first step runs eagerly and its second is captured; the batch shrinks
        // through at least two buckets.
        if stats.refused > 0 || stats.captures < 2 || stats.replays < stats.captures {
            failures.push(format!("{name}: {stats:?}"));
        }
        // A replayed step is the graph's one launch: the greedy rows' summaries are inside it.
        let fewest = graphed.launches.iter().min().copied().unwrap_or(0);
        let eager_fewest = eager.launches.iter().min().copied().unwrap_or(0);
        if fewest > 1 || eager_fewest <= 2 {
            failures.push(format!(
                "{name}: {fewest} launches in the cheapest replayed step, {eager_fewest} eager"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

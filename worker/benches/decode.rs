//! End-to-end decode: `Executor::step` on a synthetic Qwen3-MoE checkpoint (bf16, loaded through
//! `Checkpoint::open` + `load_model_spec` like any download), at batch 1 and 16.
//!
//! `cargo bench -p tessera-worker --bench decode`. Each iteration is one decode step of every
//! sequence (greedy sampling included); throughput is in tokens (criterion prints "elem/s").
//! Sequences are prefilled with 16 tokens and re-prefilled, untimed, before their context runs out.
//!
//! The model is the ~1B-parameter preset that `tessera bench --roofline` uses (generated once
//! into the same cache, ~2 GB); `TESSERA_BENCH_MODEL_SIZE=tiny` picks the test-sized one, which is
//! also the default when the bench runs as a test (`cargo test --benches`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::executor::{Executor, SeqStep};
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::model::Model;
use tessera_worker::sampling::SamplingParams;
use tessera_worker::synthetic::{SyntheticModel, cache_dir, ensure_checkpoint};

const BATCHES: &[usize] = &[1, 16];
const PROMPT: usize = 16;
const BLOCK: usize = 16;
/// Positions per sequence before it is re-prefilled.
const MAX_CONTEXT: usize = 256;

/// Sequences decoding together, and what they need between steps.
struct Batch {
    seqs: Vec<SeqStep>,
    alloc: BlockAllocator,
}

impl Batch {
    /// Releases any previous sequences and prefills `n` fresh ones (untimed).
    fn restart(&mut self, exec: &mut Executor<CpuBackend>, n: usize, vocab: usize) {
        for s in self.seqs.drain(..) {
            exec.release(s.seq_id);
            self.alloc.release(s.block_table);
        }
        for i in 0..n {
            let tokens: Vec<u32> = (0..PROMPT)
                .map(|j| ((i * 7919 + j * 104_729 + 13) % vocab) as u32)
                .collect();
            let blocks = self.alloc.allocate(MAX_CONTEXT / BLOCK).expect("blocks");
            self.seqs.push(SeqStep {
                seq_id: i as u64,
                context_len: tokens.len(),
                tokens,
                block_table: blocks,
                sampling: SamplingParams::greedy(),
                top_logprobs: 0,
                prompt_logprobs: false,
                sample: true,
                prompt_len: PROMPT,
            });
        }
        self.step(exec);
    }

    /// One step of every sequence; feeds each sampled token back as the next input.
    fn step(&mut self, exec: &mut Executor<CpuBackend>) {
        let out = exec.step(&self.seqs).expect("step");
        for (s, r) in self.seqs.iter_mut().zip(out.results) {
            s.tokens.clear();
            s.tokens.push(r.token.expect("a sampled token"));
            s.context_len += 1;
        }
    }
}

fn decode(c: &mut Criterion) {
    let benching = std::env::args().any(|a| a == "--bench");
    let size = std::env::var("TESSERA_BENCH_MODEL_SIZE")
        .unwrap_or_else(|_| if benching { "1b" } else { "tiny" }.into());
    let shape = SyntheticModel::preset(&size)
        .unwrap_or_else(|| panic!("TESSERA_BENCH_MODEL_SIZE={size}: expected 1b or tiny"));
    let (dir, _) = ensure_checkpoint(&cache_dir(&size, 0), &shape, 0).expect("checkpoint");
    let spec = load_model_spec(&dir).expect("config");
    let vocab = spec.vocab_size;
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let model = Model::load(CpuBackend, spec, &ckpt, &ShardSpec::whole()).expect("model");
    let max_batch = BATCHES.iter().copied().max().unwrap_or(1);
    let num_blocks = max_batch * MAX_CONTEXT / BLOCK;
    let mut exec = Executor::new(model, num_blocks, BLOCK).expect("executor");
    let mut group = c.benchmark_group(format!("decode_qwen3_moe_{size}"));
    for &n in BATCHES {
        let mut batch = Batch {
            seqs: Vec::new(),
            alloc: BlockAllocator::new(num_blocks, BLOCK),
        };
        batch.restart(&mut exec, n, vocab);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("step", format!("batch{n}")), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if batch.seqs[0].context_len + 1 >= MAX_CONTEXT {
                        batch.restart(&mut exec, n, vocab);
                    }
                    let t = Instant::now();
                    batch.step(&mut exec);
                    timed += t.elapsed();
                }
                black_box(&batch.seqs);
                timed
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = decode
}
criterion_main!(benches);

//! The CPU mixture-of-experts kernel (tokens grouped by expert, one parallel region per layer) at
//! the expert shapes of real configs, with bf16 weights.
//!
//! `cargo bench -p tessera-kernels --bench moe`. Throughput is the bytes of the distinct experts the
//! step's routing chose (each is read once per call whatever the batch), to compare with
//! `linear`'s `roofs/read`. Routing is a fixed pseudo-random top-k per token, as a trained router
//! spreads tokens roughly evenly.
//!
//! Only some of each model's experts are instantiated (enough that routing spreads over many and
//! weights come from DRAM, few enough to fit in memory beside other work).

mod common;

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Duration;

use common::{bf16_weight, values};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_kernels::cpu::{CpuBackend, CpuRouting, CpuWeight};
use tessera_kernels::{Backend, ExpertWeights};

/// (name, hidden, expert intermediate width, experts instantiated, top-k).
const SHAPES: &[(&str, usize, usize, usize, usize)] = &[
    // Qwen3-30B-A3B: 128 experts of 768, top-8 (64 instantiated: 600 MB).
    ("qwen3_30b_a3b", 2048, 768, 64, 8),
    // DeepSeek-V3: 256 experts of 2048 on hidden 7168, top-8 (16 instantiated: 1.4 GB).
    ("deepseek_v3", 7168, 2048, 16, 8),
];
const BATCHES: &[usize] = &[1, 16, 64];

/// Token `t` picks `k` distinct experts of `e`, pseudo-randomly, with equal weights.
fn routing(tokens: usize, e: usize, k: usize) -> CpuRouting {
    let mut experts = Vec::with_capacity(tokens * k);
    for t in 0..tokens {
        let mut chosen = BTreeSet::new();
        let mut i = 0u64;
        while chosen.len() < k {
            let h = ((t as u64) << 32 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            chosen.insert((h >> 40) as usize % e);
            i += 1;
        }
        experts.extend(chosen.into_iter().map(|x| x as u32));
    }
    CpuRouting {
        top_k: k,
        weights: vec![1.0 / k as f32; experts.len()],
        experts,
    }
}

fn moe(c: &mut Criterion) {
    let b = CpuBackend;
    let mut group = c.benchmark_group("moe_bf16");
    for &(name, hidden, inter, n_exp, top_k) in SHAPES {
        let weights: Vec<[CpuWeight; 3]> = (0..n_exp as u32)
            .map(|e| {
                [
                    bf16_weight(&b, inter, hidden, 3 * e),
                    bf16_weight(&b, inter, hidden, 3 * e + 1),
                    bf16_weight(&b, hidden, inter, 3 * e + 2),
                ]
            })
            .collect();
        let experts: Vec<Option<ExpertWeights<'_, CpuBackend>>> = weights
            .iter()
            .map(|[gate, up, down]| Some(ExpertWeights { gate, up, down }))
            .collect();
        let expert_bytes = 3 * hidden * inter * 2;
        for &t in BATCHES {
            let r = routing(t, n_exp, top_k);
            let distinct = r.experts.iter().collect::<BTreeSet<_>>().len();
            let x = b
                .tensor_from_host(values(t * hidden, 99).collect(), t, hidden)
                .expect("x");
            group.throughput(Throughput::BytesDecimal((distinct * expert_bytes) as u64));
            group.bench_function(
                BenchmarkId::new(
                    format!("{name}_{hidden}x{inter}_top{top_k}"),
                    format!("t{t}"),
                ),
                |bch| bch.iter(|| black_box(b.moe(black_box(&x), &r, &experts).expect("moe"))),
            );
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = moe
}
criterion_main!(benches);

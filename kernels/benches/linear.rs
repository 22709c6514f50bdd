//! CPU `linear` (y = x·Wᵀ, bf16 weights) at the shapes of real MoE configs, and the machine's two
//! roofs (STREAM-like read bandwidth, peak FMA throughput), so the kernel can be stated as a
//! fraction of what the machine can do.
//!
//! `cargo bench -p tessera-kernels --bench linear` (add a filter such as `-- '/t1$'` for part of
//! it). Batches of 1 and 4 tokens are bound by memory: their throughput is bytes of weights read
//! per second (10⁹ bytes = 1 GB), to compare with `roofs/read`. Batches of 16 and 64 are bound by
//! arithmetic: their throughput is in FLOP/s (criterion prints "elem/s"; one element is one
//! FLOP, a multiply-add is two), to compare with `roofs/fma_peak`. Either converts to the other:
//! bf16 weights give `FLOP = t × bytes`.
//!
//! Decode streams weights from DRAM, not from cache, so each shape cycles through enough copies of
//! its weight to exceed `TESSERA_BENCH_FOOTPRINT_MIB` (default 256 MiB, several times a typical
//! last-level cache).

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{bf16_weight, values};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_kernels::Backend;
use tessera_kernels::cpu::{CpuBackend, CpuTensor, CpuWeight, probe};

/// (name, out_features n, in_features k) from the models' `config.json`.
const SHAPES: &[(&str, usize, usize)] = &[
    // Qwen3-30B-A3B: hidden 2048, moe_intermediate 768, 32 query heads of 128.
    ("qwen3_30b_a3b/expert_gate_up", 768, 2048),
    ("qwen3_30b_a3b/expert_down", 2048, 768),
    ("qwen3_30b_a3b/attn_q", 4096, 2048),
    // DeepSeek-V3: hidden 7168, moe_intermediate 2048.
    ("deepseek_v3/expert_gate_up", 2048, 7168),
    // Mixtral-8x7B: hidden 4096, intermediate 14336.
    ("mixtral_8x7b/expert_w1", 14336, 4096),
    // `tessera bench --roofline`'s 1B model: hidden 1024, 16 query + 4+4 KV heads of 128 as one
    // fused q/k/v product, vocab 32768.
    ("roofline_1b/attn_qkv", 3072, 1024),
    ("roofline_1b/attn_o", 1024, 2048),
    ("roofline_1b/lm_head", 32768, 1024),
];

const BATCHES: &[usize] = &[1, 4, 16, 64];

fn footprint_bytes() -> usize {
    std::env::var("TESSERA_BENCH_FOOTPRINT_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

fn linear(c: &mut Criterion) {
    let backend = CpuBackend;
    let mut group = c.benchmark_group("linear_bf16");
    for &(name, n, k) in SHAPES {
        let bytes = n * k * 2;
        let copies = footprint_bytes().div_ceil(bytes).max(1);
        let weights: Vec<CpuWeight> = (0..copies)
            .map(|i| bf16_weight(&backend, n, k, i as u32))
            .collect();
        for &t in BATCHES {
            let x: CpuTensor = backend
                .tensor_from_host(values(t * k, 99).collect(), t, k)
                .expect("x");
            group.throughput(if t <= 4 {
                Throughput::BytesDecimal(bytes as u64)
            } else {
                Throughput::Elements((2 * t * n * k) as u64)
            });
            group.bench_with_input(
                BenchmarkId::new(format!("{name}_{n}x{k}"), format!("t{t}")),
                &x,
                |bch, x| {
                    let mut i = 0;
                    bch.iter(|| {
                        let w = &weights[i % copies];
                        i += 1;
                        black_box(backend.linear(black_box(x), w, None).expect("linear"))
                    })
                },
            );
        }
    }
    group.finish();
}

/// The roofs. Read bandwidth: sum a large f32 array on every rayon thread (one, four or eight
/// sequential streams per thread); the best is what `linear_bf16/*/t1` is compared with.
/// FMA peak: register-only multiply-adds on every thread, what `t16`/`t64` are compared with.
fn roofs(c: &mut Criterion) {
    let len = footprint_bytes() / 4;
    let data: Vec<f32> = values(len, 7).collect();
    let mut group = c.benchmark_group("roofs");
    group.throughput(Throughput::BytesDecimal((len * 4) as u64));
    let (mib, threads) = (len >> 18, rayon::current_num_threads());
    // The same passes `tessera bench --roofline` times (`probe::bandwidth`).
    for streams in [1, 4, 8] {
        group.bench_function(
            format!("read_{mib}MiB/threads_{threads}_x{streams}_streams"),
            |b| b.iter(|| black_box(probe::read_pass(black_box(&data[..]), streams))),
        );
    }
    const ITERS: usize = 1_000_000;
    if let Some(flops) = probe::fma_burst(ITERS) {
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(format!("fma_peak/threads_{threads}"), |b| {
            b.iter(|| black_box(probe::fma_burst(ITERS)))
        });
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
    targets = roofs, linear
}
criterion_main!(benches);

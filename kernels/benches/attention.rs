//! Paged decode attention on the CPU at Qwen3-30B-A3B's shape (32 query heads, 4 KV heads of 128),
//! Mixtral-8x7B's (32 query heads, 8 KV heads of 128) and DeepSeek-V3's latent attention at 8-way
//! tensor parallelism (16 query heads over one latent head of 576 whose first 512 values are the
//! values), over contexts of 512 and 2048 positions scattered over 16-slot blocks.
//!
//! `cargo bench -p tessera-kernels --bench attention`. Throughput is the bytes of keys and values
//! read per call (f32 cache), to compare with the `roofs` group of the `linear` bench; at these
//! sizes the cache of one call fits in L2/L3, so the numbers can exceed DRAM bandwidth.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::values;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::{
    AttentionParams, Backend, KvSpec, KvValues, RopeLayout, RopeTable, SeqMeta, StepMeta,
};

/// An attention shape: query heads over KV heads of `k_dim`, values `v_dim` wide.
struct Shape {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    k_dim: usize,
    v_dim: usize,
    values: KvValues,
}

const fn gqa(name: &'static str, heads: usize, kv_heads: usize) -> Shape {
    Shape {
        name,
        heads,
        kv_heads,
        k_dim: 128,
        v_dim: 128,
        values: KvValues::Separate,
    }
}

const SHAPES: &[Shape] = &[
    gqa("qwen3_30b_a3b", 32, 4),
    gqa("mixtral_8x7b", 32, 8),
    Shape {
        name: "deepseek_v3_latent_tp8",
        heads: 16,
        kv_heads: 1,
        k_dim: 576,
        v_dim: 512,
        values: KvValues::KeyPrefix,
    },
];
const CONTEXTS: &[usize] = &[512, 2048];
const BATCHES: &[usize] = &[1, 16];
const BLOCK: usize = 16;

fn attention(c: &mut Criterion) {
    let b = CpuBackend;
    let rope = RopeTable {
        inv_freq: vec![1.0; 64],
        attention_scaling: 1.0,
        layout: RopeLayout::Half,
    };
    let mut group = c.benchmark_group("attention");
    for shape in SHAPES {
        let (name, heads, kv_heads, d) = (shape.name, shape.heads, shape.kv_heads, shape.k_dim);
        for &ctx in CONTEXTS {
            for &batch in BATCHES {
                let per_seq = ctx.div_ceil(BLOCK);
                let spec = KvSpec {
                    num_blocks: batch * per_seq,
                    block_size: BLOCK,
                    num_kv_heads: kv_heads,
                    k_dim: d,
                    v_dim: shape.v_dim,
                    values: shape.values,
                };
                let mut cache = b.alloc_kv(spec).expect("cache");
                // Fill the cache through the backend: every sequence's whole context at once.
                let seqs: Vec<SeqMeta> = (0..batch)
                    .map(|s| SeqMeta {
                        token_start: s * ctx,
                        num_tokens: ctx,
                        context_len: ctx,
                        // Interleaved blocks, as a pool shared by many sequences hands them out.
                        block_table: (0..per_seq).map(|i| (i * batch + s) as u32).collect(),
                    })
                    .collect();
                let fill = StepMeta::without_ids(seqs.clone(), BLOCK);
                let kv = |seed, width| {
                    b.tensor_from_host(
                        values(batch * ctx * kv_heads * width, seed).collect(),
                        batch * ctx,
                        kv_heads * width,
                    )
                    .expect("kv")
                };
                let step = b.prepare_step(&fill, &rope).expect("step");
                let v = (shape.values == KvValues::Separate).then(|| kv(2, shape.v_dim));
                b.write_kv(&mut cache, &kv(1, d), v.as_ref(), &step)
                    .expect("write");
                // Decode: the last position of every sequence.
                let decode = StepMeta::without_ids(
                    seqs.into_iter()
                        .enumerate()
                        .map(|(s, m)| SeqMeta {
                            token_start: s,
                            num_tokens: 1,
                            ..m
                        })
                        .collect(),
                    BLOCK,
                );
                let step = b.prepare_step(&decode, &rope).expect("step");
                let q = b
                    .tensor_from_host(values(batch * heads * d, 3).collect(), batch, heads * d)
                    .expect("q");
                let p = AttentionParams {
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    qk_dim: d,
                    v_dim: shape.v_dim,
                    scale: (d as f32).powf(-0.5),
                    sliding_window: None,
                };
                // Elements read per position: keys, and values where they are stored apart.
                let stored = match shape.values {
                    KvValues::Separate => d + shape.v_dim,
                    KvValues::KeyPrefix => d,
                };
                group.throughput(Throughput::BytesDecimal(
                    (batch * ctx * kv_heads * stored * 4) as u64,
                ));
                group.bench_function(
                    BenchmarkId::new(format!("{name}/ctx{ctx}"), format!("t{batch}")),
                    |bch| {
                        bch.iter(|| {
                            black_box(
                                b.attention(black_box(&q), &cache, &step, &p)
                                    .expect("attention"),
                            )
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = attention
}
criterion_main!(benches);

//! MLA attention of a fresh prompt on the CPU, in both forms, at DeepSeek-V2-Lite's shape (16
//! heads, a 512-wide latent, 128-wide nope and value heads, a 64-wide rotary key): what a
//! prompt step's attention costs absorbed (queries projected into the latent space, attention
//! over the latent rows, outputs projected back) and expanded (the latent rows read out,
//! expanded by `kv_b_proj` into per-head keys and values, attention over those), from the rotated
//! queries and the filled latent cache to the per-head values `o_proj` takes.
//!
//! A later chunk of a long prompt (512 new tokens after 2048 cached ones, the fifth step of a
//! 2560-token prompt under the default 512-token step budget) also runs expanded two heads per
//! pass: what the worker's policy picks for it within the memory of a 512-row single pass.
//!
//! `cargo bench -p tessera-kernels --bench mla`. Throughput is new tokens; the forms of one
//! case run back to back in one process, so their ratios are what to read.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{bf16_weight, values};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_kernels::cpu::{CpuBackend, CpuTensor};
use tessera_kernels::{
    AttentionParams, Backend, KvRows, KvSpec, KvValues, RopeLayout, RopeTable, SeqMeta, StepMeta,
};

const HEADS: usize = 16;
const LATENT: usize = 512;
const NOPE: usize = 128;
const ROPE: usize = 64;
const V: usize = 128;
const BLOCK: usize = 16;
/// `(new tokens, context)`: two fresh prompts and a later chunk of a long one, with the heads
/// per expanded pass to time besides all of them at once.
const CASES: &[(usize, usize, Option<usize>)] =
    &[(512, 512, None), (2048, 2048, None), (512, 2560, Some(2))];

fn mla_prefill(c: &mut Criterion) {
    let b = CpuBackend;
    let rope = RopeTable {
        inv_freq: vec![1.0; ROPE / 2],
        attention_scaling: 1.0,
        layout: RopeLayout::Half,
    };
    let uk_t = bf16_weight(&b, HEADS * LATENT, NOPE, 1);
    let uv = bf16_weight(&b, HEADS * V, LATENT, 2);
    let kv_b = bf16_weight(&b, HEADS * (NOPE + V), LATENT, 3);
    let scale = ((NOPE + ROPE) as f32).powf(-0.5);
    let absorbed = AttentionParams {
        num_heads: HEADS,
        num_kv_heads: 1,
        qk_dim: LATENT + ROPE,
        v_dim: LATENT,
        scale,
        sliding_window: None,
    };
    let expanded = AttentionParams {
        num_heads: HEADS,
        num_kv_heads: HEADS,
        qk_dim: NOPE + ROPE,
        v_dim: V,
        scale,
        sliding_window: None,
    };
    let mut group = c.benchmark_group("mla_prefill");
    for &(t, ctx, passes) in CASES {
        let blocks = ctx.div_ceil(BLOCK);
        let spec = KvSpec {
            num_blocks: blocks,
            block_size: BLOCK,
            num_kv_heads: 1,
            k_dim: LATENT + ROPE,
            v_dim: LATENT,
            values: KvValues::KeyPrefix,
        };
        let meta = StepMeta::without_ids(
            vec![SeqMeta {
                token_start: 0,
                num_tokens: t,
                context_len: ctx,
                block_table: (0..blocks as u32).rev().collect(),
            }],
            BLOCK,
        );
        let mut step = b.prepare_step(&meta, &rope).expect("step");
        b.prepare_context(&mut step).expect("context");
        let mut cache = b.alloc_kv(spec).expect("cache");
        let rows = |w, seed| -> CpuTensor {
            b.tensor_from_host(values(t * w, seed).collect(), t, w)
                .expect("rows")
        };
        b.write_kv(&mut cache, &rows(LATENT + ROPE, 4), None, &step)
            .expect("write");
        let q = rows(HEADS * (NOPE + ROPE), 5);
        let name = if ctx == t {
            format!("p{t}")
        } else {
            format!("c{t}_after_{}", ctx - t)
        };
        group.throughput(Throughput::Elements(t as u64));
        group.bench_function(BenchmarkId::new(&name, "absorbed"), |bch| {
            bch.iter(|| {
                let (q_nope, q_rot) = b.split_heads(black_box(&q), HEADS, NOPE).unwrap();
                let q_latent = b.head_linear(&q_nope, &uk_t, HEADS).unwrap();
                let q = b.concat_heads(&q_latent, &q_rot, HEADS).unwrap();
                let o = b.attention(&q, &cache, &step, &absorbed).unwrap();
                black_box(b.head_linear(&o, &uv, HEADS).unwrap())
            })
        });
        // The worker's expanded form (`Mla::expanded`), `per_pass` heads at a time.
        let expand = |per_pass: usize| {
            let rows = b.gather_context(&cache, &step).unwrap();
            let latent = b.narrow_cols(&rows, 0, LATENT).unwrap();
            let rot = b.narrow_cols(&rows, LATENT, ROPE).unwrap();
            let mut out = b.zeros(t, HEADS * V).unwrap();
            for first in (0..HEADS).step_by(per_pass) {
                let n = per_pass.min(HEADS - first);
                let w = (NOPE + V) * first..(NOPE + V) * (first + n);
                let kv = b.linear_rows(&latent, &kv_b, w).unwrap();
                let (k_nope, v) = b.split_heads(&kv, n, NOPE).unwrap();
                let k = b.concat_heads_shared(&k_nope, &rot, n).unwrap();
                let kv = KvRows { k: &k, v: &v };
                let params = AttentionParams {
                    num_heads: n,
                    num_kv_heads: n,
                    ..expanded
                };
                if n == HEADS {
                    return b.attention_rows(&q, kv, &step, &params).unwrap();
                }
                let q = b
                    .narrow_cols(&q, first * (NOPE + ROPE), n * (NOPE + ROPE))
                    .unwrap();
                let o = b.attention_rows(&q, kv, &step, &params).unwrap();
                b.write_cols(&mut out, first * V, &o).unwrap();
            }
            out
        };
        group.bench_function(BenchmarkId::new(&name, "expanded"), |bch| {
            bch.iter(|| black_box(expand(HEADS)))
        });
        if let Some(per_pass) = passes {
            let id = BenchmarkId::new(&name, format!("expanded_{per_pass}_heads_per_pass"));
            group.bench_function(id, |bch| bch.iter(|| black_box(expand(per_pass))));
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = mla_prefill
}
criterion_main!(benches);

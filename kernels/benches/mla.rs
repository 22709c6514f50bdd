//! MLA attention on the CPU, in both forms, at DeepSeek-V2-Lite's shape (16 heads, a 512-wide
//! latent, 128-wide nope and value heads, a 64-wide rotary key): what a step's attention costs
//! absorbed (queries projected into the latent space, attention over the latent rows, outputs
//! projected back) and expanded (the latent rows read out, expanded by `kv_b_proj` into per-head
//! keys and values, attention over those), from the rotated queries and the filled latent cache
//! to the per-head values `o_proj` takes.
//!
//! - `mla_prefill`: two fresh prompts, and a later chunk of a long prompt (512 new tokens after
//!   2048 cached ones, the fifth step of a 2560-token prompt under the default 512-token step
//!   budget), which also runs expanded two heads per pass (what the worker's policy picks for it
//!   within the memory of a 512-row single pass) and in chunks of 512 positions merged by their
//!   log-sum-exps (what it picks when not even one head's pass fits).
//! - `mla_mixed`: a continuous-batching step, two decodes over 2048 positions beside a fresh
//!   512-token prompt, taken whole in the absorbed form (what the policy did before it split
//!   steps) and split (the decodes absorbed, the prompt expanded).
//!
//! `cargo bench -p tessera-kernels --bench mla`. Throughput is new tokens; the forms of one
//! case run back to back in one process, so their ratios are what to read.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{bf16_weight, values};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_kernels::cpu::{CpuBackend, CpuKv, CpuStep, CpuTensor, CpuWeight};
use tessera_kernels::{
    AttentionParams, AttentionPart, Backend, KvRows, KvSpec, KvValues, RopeLayout, RopeTable,
    SeqMeta, StepMeta,
};

const HEADS: usize = 16;
const LATENT: usize = 512;
const NOPE: usize = 128;
const ROPE: usize = 64;
const V: usize = 128;
const BLOCK: usize = 16;
/// A step of one sequence, `(new tokens, context)`, and the cut expansions to time besides the
/// whole one: heads per pass, positions per chunk.
struct Case {
    new: usize,
    context: usize,
    passes: Option<usize>,
    chunk: Option<usize>,
}

/// Two fresh prompts and a later chunk of a long one.
const CASES: &[Case] = &[
    Case {
        new: 512,
        context: 512,
        passes: None,
        chunk: None,
    },
    Case {
        new: 2048,
        context: 2048,
        passes: None,
        chunk: None,
    },
    Case {
        new: 512,
        context: 2560,
        passes: Some(2),
        chunk: Some(512),
    },
];

/// The weights and shapes of both forms.
struct Forms {
    b: CpuBackend,
    rope: RopeTable,
    uk_t: CpuWeight,
    uv: CpuWeight,
    kv_b: CpuWeight,
    absorbed: AttentionParams,
    expanded: AttentionParams,
}

impl Forms {
    fn new() -> Forms {
        let b = CpuBackend;
        let scale = ((NOPE + ROPE) as f32).powf(-0.5);
        Forms {
            rope: RopeTable {
                inv_freq: vec![1.0; ROPE / 2],
                attention_scaling: 1.0,
                layout: RopeLayout::Half,
            },
            uk_t: bf16_weight(&b, HEADS * LATENT, NOPE, 1),
            uv: bf16_weight(&b, HEADS * V, LATENT, 2),
            kv_b: bf16_weight(&b, HEADS * (NOPE + V), LATENT, 3),
            absorbed: AttentionParams {
                num_heads: HEADS,
                num_kv_heads: 1,
                qk_dim: LATENT + ROPE,
                v_dim: LATENT,
                scale,
                sliding_window: None,
            },
            expanded: AttentionParams {
                num_heads: HEADS,
                num_kv_heads: HEADS,
                qk_dim: NOPE + ROPE,
                v_dim: V,
                scale,
                sliding_window: None,
            },
            b,
        }
    }

    /// A latent cache holding every position of `seqs` (`(new tokens, context)` each, in
    /// consecutive blocks), and the step of their new tokens, ready for both forms (its
    /// contexts in chunks of `chunk` positions).
    fn step(&self, seqs: &[(usize, usize)], chunk: Option<usize>) -> (CpuKv, CpuStep, usize) {
        let b = &self.b;
        let (mut metas, mut fills, mut block, mut token) = (Vec::new(), Vec::new(), 0, 0);
        let mut filled = 0;
        for &(new, ctx) in seqs {
            let blocks = ctx.div_ceil(BLOCK);
            let table: Vec<u32> = (block..block + blocks).map(|v| v as u32).collect();
            metas.push(SeqMeta {
                token_start: token,
                num_tokens: new,
                context_len: ctx,
                block_table: table.clone(),
            });
            fills.push(SeqMeta {
                token_start: filled,
                num_tokens: ctx,
                context_len: ctx,
                block_table: table,
            });
            (block, token, filled) = (block + blocks, token + new, filled + ctx);
        }
        let spec = KvSpec {
            num_blocks: block,
            block_size: BLOCK,
            num_kv_heads: 1,
            k_dim: LATENT + ROPE,
            v_dim: LATENT,
            values: KvValues::KeyPrefix,
        };
        let mut cache = b.alloc_kv(spec).expect("cache");
        let fill = b
            .prepare_step(&StepMeta::without_ids(fills, BLOCK), &self.rope)
            .expect("fill");
        let rows = b
            .tensor_from_host(
                values(filled * (LATENT + ROPE), 4).collect(),
                filled,
                LATENT + ROPE,
            )
            .expect("rows");
        b.write_kv(&mut cache, &rows, None, &fill).expect("write");
        let mut step = b
            .prepare_step(&StepMeta::without_ids(metas, BLOCK), &self.rope)
            .expect("step");
        b.prepare_context(&mut step, chunk).expect("context");
        (cache, step, token)
    }

    /// Rotated queries for `t` tokens.
    fn queries(&self, t: usize) -> CpuTensor {
        let w = HEADS * (NOPE + ROPE);
        self.b
            .tensor_from_host(values(t * w, 5).collect(), t, w)
            .expect("queries")
    }

    /// The absorbed form (`Mla::absorbed`).
    fn absorbed(&self, q: &CpuTensor, cache: &CpuKv, step: &CpuStep) -> CpuTensor {
        let b = &self.b;
        let (q_nope, q_rot) = b.split_heads(q, HEADS, NOPE).unwrap();
        let q_latent = b.head_linear(&q_nope, &self.uk_t, HEADS).unwrap();
        let q = b.concat_heads(&q_latent, &q_rot, HEADS).unwrap();
        let o = b.attention(&q, cache, step, &self.absorbed).unwrap();
        b.head_linear(&o, &self.uv, HEADS).unwrap()
    }

    /// The expanded form (`Mla::expanded`), in the step's chunks, `per_pass` heads at a time.
    fn expanded(&self, q: &CpuTensor, cache: &CpuKv, step: &CpuStep, per_pass: usize) -> CpuTensor {
        let b = &self.b;
        let mut acc = self.expanded_chunk(q, (cache, step, 0), per_pass);
        for chunk in 1..b.context_chunks(step) {
            let part = self.expanded_chunk(q, (cache, step, chunk), per_pass);
            b.merge_attention(&mut acc, &part).unwrap();
        }
        acc.out
    }

    /// One chunk's part of [`Forms::expanded`].
    fn expanded_chunk(
        &self,
        q: &CpuTensor,
        (cache, step, chunk): (&CpuKv, &CpuStep, usize),
        per_pass: usize,
    ) -> AttentionPart<CpuTensor> {
        let b = &self.b;
        let rows = b.gather_context(cache, step, chunk).unwrap();
        let latent = b.narrow_cols(&rows, 0, LATENT).unwrap();
        let rot = b.narrow_cols(&rows, LATENT, ROPE).unwrap();
        let t = b.dims(q).0;
        let (mut out, mut lse) = (b.zeros(t, HEADS * V).unwrap(), b.zeros(t, HEADS).unwrap());
        for first in (0..HEADS).step_by(per_pass) {
            let n = per_pass.min(HEADS - first);
            let w = (NOPE + V) * first..(NOPE + V) * (first + n);
            let kv = b.linear_rows(&latent, &self.kv_b, w).unwrap();
            let (k_nope, v) = b.split_heads(&kv, n, NOPE).unwrap();
            let k = b.concat_heads_shared(&k_nope, &rot, n).unwrap();
            let kv = KvRows {
                k: &k,
                v: &v,
                chunk,
            };
            let params = AttentionParams {
                num_heads: n,
                num_kv_heads: n,
                ..self.expanded
            };
            if n == HEADS {
                return b.attention_rows(q, kv, step, &params).unwrap();
            }
            let q = b
                .narrow_cols(q, first * (NOPE + ROPE), n * (NOPE + ROPE))
                .unwrap();
            let part = b.attention_rows(&q, kv, step, &params).unwrap();
            b.write_cols(&mut out, first * V, &part.out).unwrap();
            b.write_cols(&mut lse, first, &part.lse).unwrap();
        }
        AttentionPart { out, lse }
    }
}

fn mla_prefill(c: &mut Criterion) {
    let f = Forms::new();
    let mut group = c.benchmark_group("mla_prefill");
    for case in CASES {
        let (t, ctx) = (case.new, case.context);
        let (cache, step, _) = f.step(&[(t, ctx)], None);
        let q = f.queries(t);
        let name = if ctx == t {
            format!("p{t}")
        } else {
            format!("c{t}_after_{}", ctx - t)
        };
        group.throughput(Throughput::Elements(t as u64));
        group.bench_function(BenchmarkId::new(&name, "absorbed"), |bch| {
            bch.iter(|| black_box(f.absorbed(black_box(&q), &cache, &step)))
        });
        group.bench_function(BenchmarkId::new(&name, "expanded"), |bch| {
            bch.iter(|| black_box(f.expanded(black_box(&q), &cache, &step, HEADS)))
        });
        if let Some(per_pass) = case.passes {
            let id = BenchmarkId::new(&name, format!("expanded_{per_pass}_heads_per_pass"));
            group.bench_function(id, |bch| {
                bch.iter(|| black_box(f.expanded(black_box(&q), &cache, &step, per_pass)))
            });
        }
        if let Some(chunk) = case.chunk {
            let (cache, step, _) = f.step(&[(t, ctx)], Some(chunk));
            let id = BenchmarkId::new(&name, format!("expanded_in_chunks_of_{chunk}"));
            group.bench_function(id, |bch| {
                bch.iter(|| black_box(f.expanded(black_box(&q), &cache, &step, HEADS)))
            });
        }
    }
    group.finish();
}

fn mla_mixed(c: &mut Criterion) {
    let f = Forms::new();
    let b = &f.b;
    let (decodes, prompt) = ([(1, 2048), (1, 2048)], (512, 512));
    let (cache, whole, t) = f.step(&[decodes[0], decodes[1], prompt], None);
    // The split's two parts over the same cache: the decodes (the same blocks as in `whole`, in
    // a cache of their own that goes unused), then the prompt (its blocks follow theirs).
    let (_, decode_step, _) = f.step(&decodes, None);
    let prompt_step = {
        let blocks = 2 * 2048 / BLOCK;
        let meta = StepMeta::without_ids(
            vec![SeqMeta {
                token_start: 0,
                num_tokens: prompt.0,
                context_len: prompt.1,
                block_table: (blocks..blocks + prompt.1.div_ceil(BLOCK))
                    .map(|v| v as u32)
                    .collect(),
            }],
            BLOCK,
        );
        let mut step = b.prepare_step(&meta, &f.rope).expect("step");
        b.prepare_context(&mut step, None).expect("context");
        step
    };
    let q = f.queries(t);
    let mut group = c.benchmark_group("mla_mixed");
    group.throughput(Throughput::Elements(t as u64));
    group.bench_function("2_decodes_2048_and_p512/absorbed_whole", |bch| {
        bch.iter(|| black_box(f.absorbed(black_box(&q), &cache, &whole)))
    });
    group.bench_function("2_decodes_2048_and_p512/split", |bch| {
        bch.iter(|| {
            let q_decodes = b.narrow_rows(black_box(&q), 0, 2).unwrap();
            let q_prompt = b.narrow_rows(&q, 2, t - 2).unwrap();
            let absorbed = f.absorbed(&q_decodes, &cache, &decode_step);
            let expanded = f.expanded(&q_prompt, &cache, &prompt_step, HEADS);
            let mut o = b.zeros(t, HEADS * V).unwrap();
            b.pack_into(&mut o, 0, &absorbed).unwrap();
            b.pack_into(&mut o, 2 * HEADS * V, &expanded).unwrap();
            black_box(o)
        })
    });
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
    targets = mla_prefill, mla_mixed
}
criterion_main!(benches);

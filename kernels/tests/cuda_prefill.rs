//! The tiled prompt attention of the CUDA backend (prefill.cu, tensor cores) against the CPU
//! backend: steps whose sequences bring many tokens each, over paged caches with scattered
//! tables, for every head grouping the kernel spreads differently, key widths of both
//! instantiations, latent caches and sliding windows, and through `attention_rows` (MLA's
//! expanded form), whole and in chunks of positions merged by their log-sum-exps (there also
//! through the decode and split-K kernels). Each case also checks which kernels ran.
//! Skipped with a visible message where no GPU (or emulator) is present, like `cuda.rs`.
//!
//! Tolerance: queries and probabilities are rounded to tf32 (10 mantissa bits) for the tensor
//! cores, so outputs differ from the CPU's f32 by about 1.5e-4 of their largest magnitude; 1e-3
//! leaves room for the sums and still fails a wrong mask, scale or row.
#![cfg(feature = "cuda")]

mod common;

use common::heads::Heads;
use common::{assert_close, bf16_round, gpu, rand_vec, rope_table};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::cuda::{CudaBackend, plan};
use tessera_kernels::{
    AttentionParams, AttentionPart, Backend, KvRows, Result, RopeLayout, SeqMeta, StepMeta,
};

const TOL: f32 = 1e-3;
const BLOCK: usize = 16;

fn seq(token_start: usize, num_tokens: usize, context_len: usize, table: &[u32]) -> SeqMeta {
    SeqMeta {
        token_start,
        num_tokens,
        context_len,
        block_table: table.to_vec(),
    }
}

/// Block tables over a cache of 24 blocks, scattered: a fresh prompt of 150 tokens (tiles of 64,
/// 64 and 22), a chunk of 37 after a cached prefix of 70 (its tile attends keys it did not
/// write), and a decode at position 49 (a tile of one).
fn tables() -> [Vec<u32>; 3] {
    [
        vec![23, 5, 17, 0, 9, 12, 3, 20, 7, 14],
        vec![1, 19, 8, 22, 4, 16, 11],
        vec![6, 21, 2, 13],
    ]
}

/// The prompt step, and the step that filled the cached prefixes before it.
fn steps() -> (StepMeta, StepMeta) {
    let [a, b, c] = tables();
    let fill = StepMeta::without_ids(vec![seq(0, 70, 70, &b), seq(70, 49, 49, &c)], BLOCK);
    let prompt = StepMeta::without_ids(
        vec![
            seq(0, 150, 150, &a),
            seq(150, 37, 107, &b),
            seq(187, 1, 50, &c),
        ],
        BLOCK,
    );
    (fill, prompt)
}

/// Attention of the prompt step over a cache the fill step and the prompt itself wrote.
fn prompt_case<B: Backend>(b: &B, h: Heads, window: Option<usize>) -> Result<Vec<f32>> {
    let mut cache = b.alloc_kv(h.kv_spec(24, BLOCK))?;
    let rope = rope_table(RopeLayout::Half, 4, 1.0);
    let (fill, prompt) = steps();
    for (meta, seed) in [(&fill, 100), (&prompt, 110)] {
        let step = b.prepare_step(meta, &rope)?;
        h.write(b, &mut cache, &step, (meta.num_tokens(), seed))?;
    }
    let n = prompt.num_tokens();
    let step = b.prepare_step(&prompt, &rope)?;
    let q = b.tensor_from_host(rand_vec(n * h.heads * h.qk, 120), n, h.heads * h.qk)?;
    b.tensor_to_host(&b.attention(&q, &cache, &step, &h.params(window))?)
}

/// The kernel `plan` picks for the prompt step on a Hopper GPU, which the backend must have run.
fn tiled_kernel(h: Heads) -> &'static str {
    let (_, prompt) = steps();
    let tiles = plan::prefill_tiles(prompt.seqs.iter().map(|s| s.num_tokens));
    let shape = plan::PrefillShape {
        group: h.heads / h.kv_heads,
        qk_dim: h.qk,
        v_dim: h.vd,
        v_stride: h.kv_spec(1, BLOCK).v_stride(),
        compute_capability: (9, 0),
        tokens: prompt.num_tokens(),
        tiles: tiles.len(),
    };
    let p = plan::prefill_plan(shape).unwrap_or_else(|| panic!("{h:?} is not tiled"));
    p.kernel.name()
}

/// Runs `case` on both backends, compares, and checks that the GPU ran `kernel` once more.
fn compare_tiled(
    what: &str,
    kernel: &str,
    cpu_case: impl FnOnce(&CpuBackend) -> Result<Vec<f32>>,
    gpu_case: impl FnOnce(&CudaBackend) -> Result<Vec<f32>>,
    launches: u64,
) {
    let Some(g) = gpu(what) else { return };
    if !plan::has_tf32_mma(g.info().compute_capability) {
        eprintln!("SKIPPED: {what}: the tensor-core kernel needs compute capability 8.0");
        return;
    }
    let want = cpu_case(&CpuBackend).expect("cpu");
    let before = g.kernel_launches(kernel);
    let got = gpu_case(&g).expect("gpu");
    assert_eq!(
        g.kernel_launches(kernel) - before,
        launches,
        "{what}: {kernel} launches"
    );
    assert_close(what, &got, &want, TOL);
}

/// Head layouts the tiled kernel spreads differently: one head per KV head (a block of 64
/// tokens), two (32 tokens of 2 heads), three and eight (16 tokens of 4 heads; 3 leaves a warp
/// idle, 8 takes two blocks per KV head); keys of 192 (the wide instantiation, MLA's expanded
/// form's width); a latent cache whose values are the keys' first elements.
const LAYOUTS: [Heads; 6] = [
    Heads::new(2, 2, 64, 64),
    Heads::new(4, 2, 32, 16),
    Heads::new(6, 2, 128, 128),
    Heads::new(16, 2, 128, 128),
    Heads::new(3, 3, 192, 128),
    Heads::latent(4, 40, 32),
];

#[test]
fn tiled_prompt_attention_matches_cpu() {
    for h in LAYOUTS {
        let kernel = tiled_kernel(h);
        for window in [None, Some(20)] {
            compare_tiled(
                &format!("tiled prompt attention {h:?}, window {window:?}"),
                kernel,
                |b| prompt_case(b, h, window),
                |b| prompt_case(b, h, window),
                1,
            );
        }
    }
}

/// MLA's expanded form over the prompt step: context rows gathered from a latent cache, per-head
/// keys (8 wide plus the 8-wide rotary part every head shares) and values, attention over the
/// rows through the dense scratch cache, in one chunk ([`chunked_case`]).
fn rows_case<B: Backend>(b: &B, window: Option<usize>) -> Result<Vec<f32>> {
    let (fill, step) = steps();
    let case = Chunked {
        fill,
        step,
        blocks: 24,
        chunk: None,
        window,
    };
    Ok(chunked_case(b, &case)?.0)
}

#[test]
fn tiled_attention_over_context_rows_matches_cpu() {
    for window in [None, Some(20)] {
        compare_tiled(
            &format!("tiled attention over context rows, window {window:?}"),
            "prefill_attention",
            |b| rows_case(b, window),
            |b| rows_case(b, window),
            1,
        );
    }
}

/// A decode step (one token per sequence) keeps the decode kernel.
#[test]
fn decode_steps_keep_the_decode_kernel() {
    let h = Heads::new(16, 2, 128, 128);
    let case = |b: &CudaBackend| -> Result<Vec<f32>> {
        let [a, bt, c] = tables();
        let meta = StepMeta::without_ids(
            vec![seq(0, 1, 150, &a), seq(1, 1, 107, &bt), seq(2, 1, 50, &c)],
            BLOCK,
        );
        let cache = b.alloc_kv(h.kv_spec(24, BLOCK))?;
        let step = b.prepare_step(&meta, &rope_table(RopeLayout::Half, 4, 1.0))?;
        let q = b.tensor_from_host(rand_vec(3 * h.heads * h.qk, 300), 3, h.heads * h.qk)?;
        b.tensor_to_host(&b.attention(&q, &cache, &step, &h.params(None))?)
    };
    let Some(g) = gpu("decode_steps_keep_the_decode_kernel") else {
        return;
    };
    let tiled = g.kernel_launches("prefill_attention");
    let out = case(&g).expect("gpu");
    assert!(out.iter().all(|x| x.is_finite()));
    assert_eq!(g.kernel_launches("prefill_attention"), tiled);
    assert!(g.kernel_launches("paged_attention") + g.kernel_launches("paged_attention_split") > 0);
}

/// With the backend's switch off (`--prefill-attention paged`), the same prompt step takes the
/// paged kernels, which compute in f32 and match the CPU to 1e-4.
#[test]
fn the_switch_sends_prompt_steps_to_the_paged_kernels() {
    let test = "the_switch_sends_prompt_steps_to_the_paged_kernels";
    let Some(g) = gpu(test) else { return };
    let h = Heads::new(16, 2, 128, 128);
    let want = prompt_case(&CpuBackend, h, None).expect("cpu");
    let switch = g.tensor_core_prefill();
    switch.store(false, std::sync::atomic::Ordering::Relaxed);
    let (tiled, paged) = (
        g.kernel_launches("prefill_attention"),
        g.kernel_launches("paged_attention"),
    );
    let got = prompt_case(&g, h, None).expect("gpu");
    assert_eq!(g.kernel_launches("prefill_attention"), tiled);
    assert_eq!(g.kernel_launches("paged_attention"), paged + 1);
    assert_close(test, &got, &want, 1e-4);
}

/// Attention over context rows in chunks: the steps, the cache blocks they need, the positions
/// per chunk (`None`: one chunk), and the sliding window.
struct Chunked {
    fill: StepMeta,
    step: StepMeta,
    blocks: usize,
    chunk: Option<usize>,
    window: Option<usize>,
}

/// MLA's expanded form in chunks of `c.chunk` positions over a latent cache `c.fill` and
/// `c.step` wrote: per chunk, its rows gathered, per-head keys (with the shared rotary part) and
/// values made from them, and its part of the attention, merged into the chunks' before it.
/// Gives the merged outputs with every part's, and the merged log-sum-exps with every part's.
fn chunked_case<B: Backend>(b: &B, c: &Chunked) -> Result<(Vec<f32>, Vec<f32>)> {
    let latent = Heads::latent(4, 24, 16);
    let mut cache = b.alloc_kv(latent.kv_spec(c.blocks, c.step.block_size))?;
    let rope = rope_table(RopeLayout::Half, 4, 1.0);
    for (meta, seed) in [(&c.fill, 400), (&c.step, 410)] {
        let step = b.prepare_step(meta, &rope)?;
        latent.write(b, &mut cache, &step, (meta.num_tokens(), seed))?;
    }
    let mut step = b.prepare_step(&c.step, &rope)?;
    b.prepare_context(&mut step, c.chunk)?;
    let (heads, n) = (4, c.step.num_tokens());
    let q = b.tensor_from_host(rand_vec(n * heads * 16, 420), n, heads * 16)?;
    let p = AttentionParams {
        num_heads: heads,
        num_kv_heads: heads,
        qk_dim: 16,
        v_dim: 16,
        scale: 0.25,
        sliding_window: c.window,
    };
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    let mut merged: Option<AttentionPart<B::Tensor>> = None;
    for chunk in 0..b.context_chunks(&step) {
        let rows = b.gather_context(&cache, &step, chunk)?;
        let r = b.dims(&rows).0;
        let seed = 430 + 10 * chunk as u64;
        let nope = b.tensor_from_host(bf16_round(&rand_vec(r * heads * 8, seed)), r, heads * 8)?;
        let k = b.concat_heads_shared(&nope, &b.narrow_cols(&rows, 16, 8)?, heads)?;
        let v = b.tensor_from_host(
            bf16_round(&rand_vec(r * heads * 16, seed + 1)),
            r,
            heads * 16,
        )?;
        let part = b.attention_rows(
            &q,
            KvRows {
                k: &k,
                v: &v,
                chunk,
            },
            &step,
            &p,
        )?;
        outs.extend(b.tensor_to_host(&part.out)?);
        lses.extend(b.tensor_to_host(&part.lse)?);
        match &mut merged {
            None => merged = Some(part),
            Some(acc) => b.merge_attention(acc, &part)?,
        }
    }
    let merged = merged.expect("a chunk");
    outs.extend(b.tensor_to_host(&merged.out)?);
    lses.extend(b.tensor_to_host(&merged.lse)?);
    Ok((outs, lses))
}

/// Runs a chunked case on both backends and compares outputs and log-sum-exps (rows that attend
/// none of a chunk's keys must be `-inf` on both), counting the launches of `kernels` it must
/// have made: `(name, at least)`.
fn compare_chunked(what: &str, c: &Chunked, kernels: &[(&str, u64)]) {
    let Some(g) = gpu(what) else { return };
    let (want_out, want_lse) = chunked_case(&CpuBackend, c).expect("cpu");
    let before: Vec<u64> = kernels.iter().map(|(k, _)| g.kernel_launches(k)).collect();
    let (got_out, got_lse) = chunked_case(&g, c).expect("gpu");
    for ((k, least), before) in kernels.iter().zip(before) {
        let ran = g.kernel_launches(k) - before;
        assert!(
            ran >= *least,
            "{what}: {k} ran {ran} times, want at least {least}"
        );
    }
    assert_close(&format!("{what}: outputs"), &got_out, &want_out, TOL);
    let empty = |v: &[f32]| -> Vec<bool> { v.iter().map(|x| *x == f32::NEG_INFINITY).collect() };
    assert_eq!(
        empty(&got_lse),
        empty(&want_lse),
        "{what}: rows without keys"
    );
    assert!(
        empty(&want_lse).contains(&true),
        "{what}: no row misses a chunk"
    );
    let finite = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| x.max(-1e3)).collect() };
    assert_close(
        &format!("{what}: log-sum-exps"),
        &finite(&got_lse),
        &finite(&want_lse),
        TOL,
    );
}

#[test]
fn chunked_context_rows_merge_like_the_cpu() {
    let (fill, prompt) = steps();
    let [a, bt, c] = tables();
    // The prompt step (tiled kernel) in chunks of 32 positions: 150 positions make 5 chunks,
    // of which the decode at 49 reaches two and the chunk after 70 cached four.
    for window in [None, Some(20)] {
        let case = Chunked {
            fill: fill.clone(),
            step: prompt.clone(),
            blocks: 24,
            chunk: Some(32),
            window,
        };
        let tiled = if gpu("tensor cores")
            .is_some_and(|g| plan::has_tf32_mma(g.info().compute_capability))
        {
            5
        } else {
            0
        };
        compare_chunked(
            &format!("chunked prompt attention, window {window:?}"),
            &case,
            &[("prefill_attention", tiled), ("merge_attention", 4)],
        );
    }
    // Decodes at 150, 107 and 50 (decode kernel) in chunks of 64.
    let decode = StepMeta::without_ids(
        vec![seq(0, 1, 150, &a), seq(1, 1, 107, &bt), seq(2, 1, 50, &c)],
        BLOCK,
    );
    let fill_decode = StepMeta::without_ids(
        vec![
            seq(0, 149, 149, &a),
            seq(149, 106, 106, &bt),
            seq(255, 49, 49, &c),
        ],
        BLOCK,
    );
    let case = Chunked {
        fill: fill_decode,
        step: decode,
        blocks: 24,
        chunk: Some(64),
        window: None,
    };
    compare_chunked("chunked decode attention", &case, &[("merge_attention", 2)]);
    // A decode at 1300 and one at 40, in chunks of 512: few enough rows that the GPU splits the
    // positions of the two full chunks (split-K; the last holds 276), the chunks past the short
    // context empty for it.
    let long: Vec<u32> = (0..82).rev().collect();
    let case = Chunked {
        fill: StepMeta::without_ids(
            vec![seq(0, 1299, 1299, &long), seq(1299, 39, 39, &[82, 83, 84])],
            BLOCK,
        ),
        step: StepMeta::without_ids(
            vec![seq(0, 1, 1300, &long), seq(1, 1, 40, &[82, 83, 84])],
            BLOCK,
        ),
        blocks: 90,
        chunk: Some(512),
        window: None,
    };
    compare_chunked(
        "chunked split-K attention",
        &case,
        &[
            ("paged_attention_split", 2),
            ("attention_combine", 2),
            ("merge_attention", 2),
        ],
    );
}

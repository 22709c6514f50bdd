//! The CUDA backend against the CPU backend (the reference), op by op, on small random inputs.
//!
//! Every GPU test opens device 0 first; where that gives `CudaNotAvailable` (no driver, no GPU,
//! no toolkit libraries) it prints `SKIPPED: <reason>` to stderr and returns, so the suite passes
//! on machines without a GPU. `no_gpu_is_a_typed_error` is the one test that checks something on
//! such a machine: opening the device fails with a message naming the missing library.
//! CI also runs the whole file on the CPU emulator of the driver, NVRTC and cuBLAS
//! (`tests/cuda-emulator`), where every test runs the real backend code and kernels.
//!
//! Tolerances are relative to the largest magnitude of the reference output. f32 paths differ
//! from the CPU only in summation order (1e-4); products with 16-bit weights round the
//! activations to the weight's type for the tensor cores (2e-2 for bf16, 5e-3 for f16).
#![cfg(feature = "cuda")]

mod common;

use common::heads::Heads;
use common::{assert_close, bf16_round, gpu, ids_meta, rand_vec, rope_table, weight};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::cuda::{CudaBackend, plan, probe_libraries};
use tessera_kernels::{
    AttentionParams, Backend, BackendError, DType, ExpertWeights, KvRows, KvSpec, Result,
    RopeApply, RopeLayout, RowSummary, SeqMeta, StepMeta,
};

/// Runs `case` on the CPU and on the GPU and compares the outputs.
fn compare<F, G>(test: &str, tol: f32, cpu_case: F, gpu_case: G)
where
    F: FnOnce(&CpuBackend) -> Result<Vec<f32>>,
    G: FnOnce(&CudaBackend) -> Result<Vec<f32>>,
{
    let Some(g) = gpu(test) else { return };
    let want = cpu_case(&CpuBackend).expect("cpu");
    let got = gpu_case(&g).expect("gpu");
    assert_close(test, &got, &want, tol);
}

/// Both backends run the same generic case.
macro_rules! same_case {
    ($test:expr, $tol:expr, $case:ident $(, $arg:expr)*) => {
        compare($test, $tol, |b| $case(b $(, $arg)*), |b| $case(b $(, $arg)*))
    };
}

#[test]
fn no_gpu_is_a_typed_error() {
    match probe_libraries() {
        Ok(()) => {
            eprintln!("SKIPPED: no_gpu_is_a_typed_error: the CUDA libraries are present here")
        }
        Err(BackendError::CudaNotAvailable(msg)) => {
            assert!(msg.contains("not found") && msg.contains(".so"), "{msg}");
            match CudaBackend::new(0) {
                Err(BackendError::CudaNotAvailable(m)) => {
                    assert!(m.contains("lib") && m.contains("not found"), "{m}")
                }
                other => panic!("expected CudaNotAvailable, got {other:?}"),
            }
        }
        Err(e) => panic!("expected CudaNotAvailable, got {e}"),
    }
}

#[test]
fn device_info_and_kernels_load() {
    let Some(g) = gpu("device_info_and_kernels_load") else {
        return;
    };
    let info = g.info();
    eprintln!("{} {info:?}", g.name());
    assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
    assert!(info.compute_capability.0 >= 7);
    // A second backend reuses the compiled kernels.
    let again = CudaBackend::new(0).expect("second open");
    assert_eq!(again.info().compute_capability, info.compute_capability);
}

fn embedding_case<B: Backend>(b: &B, dtype: DType) -> Result<Vec<f32>> {
    let table = b.upload_weight(weight(rand_vec(50 * 24, 1), vec![50, 24], dtype))?;
    let rope = rope_table(RopeLayout::Half, 2, 1.0);
    let step = b.prepare_step(&ids_meta(&[3, 0, 49, 3, 17]), &rope)?;
    let x = b.embedding(&table, &step)?;
    b.tensor_to_host(&x)
}

#[test]
fn embedding_matches_cpu() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        same_case!("embedding", 0.0, embedding_case, dtype);
    }
}

fn linear_case<B: Backend>(b: &B, dtype: DType, tokens: usize) -> Result<Vec<f32>> {
    let (n, k) = (48, 96);
    let w = b.upload_weight(weight(rand_vec(n * k, 2), vec![n, k], dtype))?;
    let bias = b.upload_weight(weight(rand_vec(n, 3), vec![n], DType::F32))?;
    let x = b.tensor_from_host(rand_vec(tokens * k, 4), tokens, k)?;
    let y = b.linear(&x, &w, Some(&bias))?;
    let z = b.linear(&x, &w, None)?;
    let mut out = b.tensor_to_host(&y)?;
    out.extend(b.tensor_to_host(&z)?);
    // Ranges of the weight's rows, read in place (MLA's expanded form, a few heads a pass).
    for rows in [0..n, 5..17, 40..48, 47..48] {
        out.extend(b.tensor_to_host(&b.linear_rows(&x, &w, rows)?)?);
    }
    Ok(out)
}

#[test]
fn linear_matches_cpu() {
    for tokens in [1, 7, 33] {
        same_case!("linear f32", 1e-4, linear_case, DType::F32, tokens);
        same_case!("linear f16", 5e-3, linear_case, DType::F16, tokens);
        same_case!("linear bf16", 2e-2, linear_case, DType::BF16, tokens);
    }
}

/// Per-head products (MLA's absorbed projections): `heads` blocks of `[n, k]`, including one
/// head (the plain GEMM path) and a head count above the batch's other dims.
fn head_linear_case<B: Backend>(b: &B, dtype: DType, tokens: usize) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (heads, n, k) in [(4, 24, 16), (1, 40, 24), (16, 8, 12)] {
        let w = b.upload_weight(weight(
            rand_vec(heads * n * k, 12),
            vec![heads * n, k],
            dtype,
        ))?;
        let x = b.tensor_from_host(rand_vec(tokens * heads * k, 13), tokens, heads * k)?;
        out.extend(b.tensor_to_host(&b.head_linear(&x, &w, heads)?)?);
    }
    Ok(out)
}

#[test]
fn head_linear_matches_cpu() {
    for tokens in [1, 9] {
        same_case!(
            "head_linear f32",
            1e-4,
            head_linear_case,
            DType::F32,
            tokens
        );
        same_case!(
            "head_linear bf16",
            2e-2,
            head_linear_case,
            DType::BF16,
            tokens
        );
    }
}

fn mlp_case<B: Backend>(b: &B) -> Result<Vec<f32>> {
    let (h, i) = (32, 64);
    let gate = b.upload_weight(weight(rand_vec(i * h, 5), vec![i, h], DType::BF16))?;
    let up = b.upload_weight(weight(rand_vec(i * h, 6), vec![i, h], DType::BF16))?;
    let down = b.upload_weight(weight(rand_vec(h * i, 7), vec![h, i], DType::BF16))?;
    let x = b.tensor_from_host(rand_vec(5 * h, 8), 5, h)?;
    let e = ExpertWeights {
        gate: &gate,
        up: &up,
        down: &down,
    };
    b.tensor_to_host(&b.mlp(&x, &e)?)
}

#[test]
fn mlp_matches_cpu() {
    same_case!("mlp bf16", 3e-2, mlp_case);
}

fn rms_norm_case<B: Backend>(b: &B, group: usize) -> Result<Vec<f32>> {
    let w = b.upload_weight(weight(rand_vec(group, 9), vec![group], DType::BF16))?;
    let x = b.tensor_from_host(rand_vec(6 * 64, 10), 6, 64)?;
    b.tensor_to_host(&b.rms_norm(&x, &w, 1e-6)?)
}

/// The fused residual add and norm: the normed rows, then the updated residual.
fn add_rms_norm_case<B: Backend>(b: &B, group: usize) -> Result<Vec<f32>> {
    let mut x = b.tensor_from_host(rand_vec(5 * 64, 21), 5, 64)?;
    let y = b.tensor_from_host(rand_vec(5 * 64, 22), 5, 64)?;
    let w = b.upload_weight(weight(rand_vec(group, 23), vec![group], DType::F32))?;
    let mut out = b.tensor_to_host(&b.add_rms_norm(&mut x, &y, &w, 1e-6)?)?;
    out.extend(b.tensor_to_host(&x)?);
    Ok(out)
}

#[test]
fn add_rms_norm_matches_cpu() {
    same_case!("add_rms_norm row", 1e-5, add_rms_norm_case, 64);
    same_case!("add_rms_norm per head", 1e-5, add_rms_norm_case, 16);
}

#[test]
fn rms_norm_matches_cpu() {
    same_case!("rms_norm row", 1e-5, rms_norm_case, 64);
    same_case!("rms_norm per head", 1e-5, rms_norm_case, 16);
}

/// Every elementwise and reshuffling op, outputs concatenated.
fn elementwise_case<B: Backend>(b: &B) -> Result<Vec<f32>> {
    let (r, c) = (5, 24);
    let x = b.tensor_from_host(rand_vec(r * c, 11), r, c)?;
    let y = b.tensor_from_host(rand_vec(r * c, 12), r, c)?;
    let g = b.tensor_from_host(rand_vec(r, 13), r, 1)?;
    let mut out = Vec::new();
    let mut s = b.silu_mul(&x, &y)?;
    out.extend(b.tensor_to_host(&s)?);
    b.add_assign(&mut s, &x)?;
    out.extend(b.tensor_to_host(&s)?);
    b.mul_sigmoid_rows(&mut s, &g)?;
    out.extend(b.tensor_to_host(&s)?);
    out.extend(b.tensor_to_host(&b.narrow_cols(&x, 5, 11)?)?);
    let (xa, xb) = b.split_heads(&x, 3, 5)?;
    out.extend(b.tensor_to_host(&xa)?);
    out.extend(b.tensor_to_host(&xb)?);
    out.extend(b.tensor_to_host(&b.concat_heads(&xa, &xb, 3)?)?);
    // Heads of different widths, and one head (a plain column concatenation).
    let y6 = b.narrow_cols(&y, 0, 6)?;
    out.extend(b.tensor_to_host(&b.concat_heads(&xa, &y6, 3)?)?);
    out.extend(b.tensor_to_host(&b.concat_heads(&y6, &x, 1)?)?);
    out.extend(b.tensor_to_host(&b.gather_rows(&x, &[4, 0, 0, 2])?)?);
    // Columns written into a wider tensor, the other columns kept.
    let mut wide = b.tensor_from_host(rand_vec(r * 30, 14), r, 30)?;
    b.write_cols(&mut wide, 7, &y6)?;
    b.write_cols(&mut wide, 6, &b.narrow_cols(&x, 23, 1)?)?;
    b.write_cols(&mut wide, 30 - c, &x)?;
    out.extend(b.tensor_to_host(&wide)?);
    out.extend(b.tensor_to_host(&b.narrow_rows(&wide, 1, 3)?)?);
    out.extend(b.tensor_to_host(&b.narrow_rows(&x, 4, 1)?)?);
    Ok(out)
}

#[test]
fn elementwise_ops_match_cpu() {
    same_case!("elementwise", 1e-5, elementwise_case);
}

/// Two sequences: a prefill of 3 new tokens at positions 2..5 and a decode at position 40.
fn step_meta() -> StepMeta {
    StepMeta::without_ids(
        vec![
            SeqMeta {
                token_start: 0,
                num_tokens: 3,
                context_len: 5,
                block_table: vec![3, 1],
            },
            SeqMeta {
                token_start: 3,
                num_tokens: 1,
                context_len: 41,
                block_table: vec![0, 2, 4, 5, 6, 7],
            },
        ],
        8,
    )
}

fn rope_case<B: Backend>(b: &B, layout: RopeLayout) -> Result<Vec<f32>> {
    let meta = step_meta();
    let step = b.prepare_step(&meta, &rope_table(layout, 4, 1.25))?;
    // 3 heads of 12 columns, the 8 rotary ones starting at column 2 (an MLA-like layout).
    let mut x = b.tensor_from_host(rand_vec(4 * 36, 14), 4, 36)?;
    let at = RopeApply {
        num_heads: 3,
        head_stride: 12,
        offset: 2,
    };
    b.rope(&mut x, &step, at)?;
    b.tensor_to_host(&x)
}

/// Norm then RoPE: per-head weights (the fused kernel; partial rotary at an offset) and a
/// whole-row weight (the composition).
fn norm_rope_case<B: Backend>(b: &B, layout: RopeLayout, group: usize) -> Result<Vec<f32>> {
    let meta = step_meta();
    let step = b.prepare_step(&meta, &rope_table(layout, 4, 1.25))?;
    let x = b.tensor_from_host(rand_vec(4 * 36, 24), 4, 36)?;
    let w = b.upload_weight(weight(rand_vec(group, 25), vec![group], DType::BF16))?;
    let at = RopeApply {
        num_heads: 3,
        head_stride: 12,
        offset: 2,
    };
    b.tensor_to_host(&b.norm_rope(&x, &w, 1e-6, &step, at)?)
}

#[test]
fn norm_rope_matches_cpu() {
    for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
        same_case!("norm_rope per head", 1e-5, norm_rope_case, layout, 12);
        same_case!("norm_rope whole row", 1e-5, norm_rope_case, layout, 36);
    }
}

#[test]
fn rope_matches_cpu() {
    same_case!("rope half", 1e-5, rope_case, RopeLayout::Half);
    same_case!("rope interleaved", 1e-5, rope_case, RopeLayout::Interleaved);
}

/// Head layouts the GPU's grouping must get right: 2 query heads per KV head; 8 (one block
/// serves a KV head's whole group, Qwen3-30B-A3B's shape); 20 over one KV head (two blocks of 10)
/// with an odd value width; multi-head attention with the narrow kernel's widest value head (256)
/// and a key width that is no multiple of 8 (the kernel's scalar key loads; the others take
/// 16-byte loads); latent caches (values read from the keys): a small one, and DeepSeek-V3's
/// 576-wide rows with 512-wide values at 8-way tensor parallelism (16 heads: the wide kernel,
/// two blocks of 8).
const HEAD_LAYOUTS: [Heads; 6] = [
    Heads::new(4, 2, 16, 8),
    Heads::new(16, 2, 128, 128),
    Heads::new(20, 1, 32, 7),
    Heads::new(3, 3, 20, 256),
    Heads::latent(4, 24, 16),
    Heads::latent(16, 576, 512),
];

/// Writes two steps into a cache (the second overwriting nothing), then attends; K and V are
/// bf16-representable so that the GPU's bf16 cache holds them exactly.
fn attention_case<B: Backend>(b: &B, h: Heads, window: Option<usize>) -> Result<Vec<f32>> {
    let Heads { heads, qk, .. } = h;
    let mut cache = b.alloc_kv(h.kv_spec(8, 8))?;
    let rope = rope_table(RopeLayout::Half, 4, 1.0);
    // First fill every earlier position: a prefill of 2 for sequence 0 and 40 for sequence 1.
    let fill = StepMeta::without_ids(
        vec![
            SeqMeta {
                token_start: 0,
                num_tokens: 2,
                context_len: 2,
                block_table: vec![3, 1],
            },
            SeqMeta {
                token_start: 2,
                num_tokens: 40,
                context_len: 40,
                block_table: vec![0, 2, 4, 5, 6, 7],
            },
        ],
        8,
    );
    for (meta, seed) in [(fill, 20), (step_meta(), 30)] {
        let step = b.prepare_step(&meta, &rope)?;
        h.write(b, &mut cache, &step, (meta.num_tokens(), seed))?;
    }
    let meta = step_meta();
    let step = b.prepare_step(&meta, &rope)?;
    let q = b.tensor_from_host(rand_vec(4 * heads * qk, 40), 4, heads * qk)?;
    b.tensor_to_host(&b.attention(&q, &cache, &step, &h.params(window))?)
}

#[test]
fn paged_attention_matches_cpu() {
    for h in HEAD_LAYOUTS {
        same_case!(&format!("attention {h:?}"), 1e-4, attention_case, h, None);
        same_case!(
            &format!("attention {h:?}, sliding window"),
            1e-4,
            attention_case,
            h,
            Some(6)
        );
    }
}

/// MLA's expanded form over a latent cache filled as in `attention_case`: the step's context rows
/// read out (46 over scattered blocks: a prefill over a cached prefix, and a decode), per-head
/// keys made from them with the rotary part every head shares, and attention over the rows for
/// both multi-head and grouped layouts.
fn context_rows_case<B: Backend>(b: &B, window: Option<usize>) -> Result<Vec<f32>> {
    let latent = Heads::latent(4, 24, 16);
    let mut cache = b.alloc_kv(latent.kv_spec(8, 8))?;
    let rope = rope_table(RopeLayout::Half, 4, 1.0);
    let meta = step_meta();
    // Every position of both contexts first, as one prefill each.
    let mut start = 0;
    let seqs = meta.seqs.iter().map(|s| {
        start += s.context_len;
        SeqMeta {
            token_start: start - s.context_len,
            num_tokens: s.context_len,
            ..s.clone()
        }
    });
    let fill = StepMeta::without_ids(seqs.collect(), 8);
    let mut out = Vec::new();
    let step = b.prepare_step(&fill, &rope)?;
    latent.write(b, &mut cache, &step, (fill.num_tokens(), 50))?;
    let mut step = b.prepare_step(&meta, &rope)?;
    b.prepare_context(&mut step, None)?;
    let rows = b.gather_context(&cache, &step, 0)?;
    let c = meta.context_rows();
    out.extend(b.tensor_to_host(&rows)?);
    let shared = b.narrow_cols(&rows, 16, 8)?;
    for (heads, kv_heads) in [(4, 4), (6, 2)] {
        let nope =
            b.tensor_from_host(bf16_round(&rand_vec(c * kv_heads * 8, 51)), c, kv_heads * 8)?;
        let k = b.concat_heads_shared(&nope, &shared, kv_heads)?;
        out.extend(b.tensor_to_host(&k)?);
        let v = b.tensor_from_host(
            bf16_round(&rand_vec(c * kv_heads * 12, 52)),
            c,
            kv_heads * 12,
        )?;
        let q = b.tensor_from_host(rand_vec(4 * heads * 16, 53), 4, heads * 16)?;
        let p = AttentionParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            qk_dim: 16,
            v_dim: 12,
            scale: 0.25,
            sliding_window: window,
        };
        let kv = KvRows {
            k: &k,
            v: &v,
            chunk: 0,
        };
        out.extend(b.tensor_to_host(&b.attention_rows(&q, kv, &step, &p)?.out)?);
    }
    Ok(out)
}

#[test]
fn context_rows_match_cpu() {
    same_case!("context rows", 1e-4, context_rows_case, None);
    same_case!(
        "context rows, sliding window",
        1e-4,
        context_rows_case,
        Some(6)
    );
}

/// Decode of two sequences, one with a long context (1300 positions over 82 blocks in reverse
/// order) and one short (40): few enough rows that the GPU splits each row's positions
/// (split-K), with uneven splits and, for the short sequence, empty ones.
fn long_attention_case<B: Backend>(b: &B, h: Heads, window: Option<usize>) -> Result<Vec<f32>> {
    let Heads { heads, qk, .. } = h;
    let bs = 16;
    let mut cache = b.alloc_kv(h.kv_spec(90, bs))?;
    let rope = rope_table(RopeLayout::Half, 4, 1.0);
    let long_table: Vec<u32> = (0..82).rev().collect();
    let seq = |start, tokens, context, table: &[u32]| SeqMeta {
        token_start: start,
        num_tokens: tokens,
        context_len: context,
        block_table: table.to_vec(),
    };
    let fill = StepMeta::without_ids(
        vec![
            seq(0, 1299, 1299, &long_table),
            seq(1299, 39, 39, &[82, 83, 84]),
        ],
        bs,
    );
    let decode = StepMeta::without_ids(
        vec![seq(0, 1, 1300, &long_table), seq(1, 1, 40, &[82, 83, 84])],
        bs,
    );
    for (meta, seed) in [(&fill, 60), (&decode, 70)] {
        let step = b.prepare_step(meta, &rope)?;
        h.write(b, &mut cache, &step, (meta.num_tokens(), seed))?;
    }
    let step = b.prepare_step(&decode, &rope)?;
    let q = b.tensor_from_host(rand_vec(2 * heads * qk, 80), 2, heads * qk)?;
    b.tensor_to_host(&b.attention(&q, &cache, &step, &h.params(window))?)
}

#[test]
fn row_summaries_match_the_host() {
    let Some(g) = gpu("row_summaries_match_the_host") else {
        return;
    };
    // A vocabulary-sized row count that is no multiple of the block, with: a tie for the
    // maximum (the lower index wins), masked (-inf) entries, a fully masked row, large values.
    let cols = 151_937;
    let mut x = rand_vec(4 * cols, 90);
    x[17] = 3.0;
    x[cols - 1] = 3.0;
    for v in &mut x[cols..cols + 1000] {
        *v = f32::NEG_INFINITY;
    }
    x[2 * cols..3 * cols].fill(f32::NEG_INFINITY);
    for v in &mut x[3 * cols..] {
        *v *= 80.0;
    }
    let want = CpuBackend
        .row_summaries(&CpuBackend.tensor_from_host(x.clone(), 4, cols).unwrap(), 4)
        .unwrap();
    let gx = g.tensor_from_host(x, 4, cols).unwrap();
    let got = g.row_summaries(&gx, 4).unwrap();
    // The first rows only, as a graph's padded output is read.
    assert_eq!(g.row_summaries(&gx, 2).unwrap(), got[..2]);
    assert!(g.row_summaries(&gx, 5).is_err());
    assert_eq!(want[0].argmax, 17, "{want:?}");
    assert_eq!(want[2].argmax, 0, "{want:?}");
    for (r, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            (a.argmax, a.max),
            (b.argmax, b.max),
            "row {r}: {a:?} vs {b:?}"
        );
        let close = a.log_sum_exp == b.log_sum_exp
            || (a.log_sum_exp - b.log_sum_exp).abs() <= 1e-5 * b.log_sum_exp.abs().max(1.0);
        assert!(close, "row {r}: {a:?} vs {b:?}");
    }
    assert!(
        g.row_summaries(&g.tensor_from_host(vec![], 3, 0).unwrap(), 3)
            .is_err()
    );
    // Left on the device and packed behind other results, as a graph gathers them for one copy
    // to the host: the same summaries, the other values untouched around them.
    let packed = g.summarize_rows(&gx, 4).unwrap();
    assert_eq!(g.dims(&packed), (4, RowSummary::PACKED));
    let counts = g.tensor_from_host(vec![7.0, 8.0], 1, 2).unwrap();
    let len = 1 + 4 * RowSummary::PACKED + 2;
    let mut results = g.tensor_from_host(vec![-1.0; len + 1], 1, len + 1).unwrap();
    g.pack_into(&mut results, 1, &packed).unwrap();
    g.pack_into(&mut results, 1 + 4 * RowSummary::PACKED, &counts)
        .unwrap();
    let host = g.tensor_to_host(&results).unwrap();
    assert_eq!((host[0], host[len]), (-1.0, -1.0), "{host:?}");
    assert_eq!(RowSummary::unpack(&host[1..1 + 12]), got);
    assert_eq!(host[len - 2..len], [7.0, 8.0]);
    let err = g.pack_into(&mut results, len, &counts).unwrap_err();
    assert!(err.to_string().contains("2 elements at"), "{err}");
    // A results buffer made on the device starts at zero (the emulator fills fresh memory with
    // 0xff, so a missing memset shows).
    let zeros = g.zeros(3, 5).unwrap();
    assert_eq!(g.dims(&zeros), (3, 5));
    assert_eq!(g.tensor_to_host(&zeros).unwrap(), vec![0.0; 15]);
}

#[test]
fn split_k_decode_attention_matches_cpu() {
    let Some(g) = gpu("split_k_decode_attention_matches_cpu") else {
        return;
    };
    // Each case must take the split path on this device: 2 tokens x its blocks per token.
    let sms = g.info().multiprocessors;
    drop(g);
    for h in [
        Heads::new(4, 2, 32, 24),
        Heads::new(16, 2, 64, 64),
        Heads::latent(16, 576, 512),
    ] {
        let grouping = plan::attention_grouping(h.heads / h.kv_heads, h.qk, h.vd).unwrap();
        let blocks = 2 * h.kv_heads * grouping.head_groups;
        for span in [1300, 700] {
            let splits = plan::attention_splits(blocks, span, sms);
            assert!(
                splits > 1,
                "{splits} split(s) for {span} positions on {sms} SMs"
            );
        }
        same_case!(
            &format!("split-K attention {h:?}"),
            1e-4,
            long_attention_case,
            h,
            None
        );
        same_case!(
            &format!("split-K attention {h:?}, sliding window"),
            1e-4,
            long_attention_case,
            h,
            Some(700)
        );
    }
}

#[test]
fn invalid_inputs_are_errors_not_panics() {
    let Some(g) = gpu("invalid_inputs_are_errors_not_panics") else {
        return;
    };
    let table = g
        .upload_weight(weight(rand_vec(20, 1), vec![5, 4], DType::BF16))
        .unwrap();
    let rope = rope_table(RopeLayout::Half, 2, 1.0);
    let step = g.prepare_step(&ids_meta(&[5]), &rope).unwrap();
    assert!(matches!(
        g.embedding(&table, &step),
        Err(BackendError::Invalid { .. })
    ));
    let x = g.tensor_from_host(rand_vec(12, 2), 3, 4).unwrap();
    assert!(matches!(
        g.gather_rows(&x, &[3]),
        Err(BackendError::Invalid { .. })
    ));
    let spec = Heads::new(1, 1, 4, 4).kv_spec(2, 8);
    let mut cache = g.alloc_kv(spec).unwrap();
    let meta = StepMeta::without_ids(
        vec![SeqMeta {
            token_start: 0,
            num_tokens: 1,
            context_len: 1,
            block_table: vec![7],
        }],
        8,
    );
    let step = g
        .prepare_step(&meta, &rope_table(RopeLayout::Half, 2, 1.0))
        .unwrap();
    let kv = g.tensor_from_host(rand_vec(4, 3), 1, 4).unwrap();
    assert!(matches!(
        g.write_kv(&mut cache, &kv, Some(&kv), &step),
        Err(BackendError::Invalid { .. })
    ));
    // Values for a cache that takes them from its keys, and none for one that stores them.
    let latent = Heads::latent(1, 4, 2).kv_spec(8, 8);
    let mut latent_cache = g.alloc_kv(latent).unwrap();
    let err = g
        .write_kv(&mut latent_cache, &kv, Some(&kv), &step)
        .unwrap_err();
    assert!(
        err.to_string().contains("takes them from its keys"),
        "{err}"
    );
    let err = g.write_kv(&mut cache, &kv, None, &step).unwrap_err();
    assert!(err.to_string().contains("no values"), "{err}");
    // Values longer than the keys they would be read from.
    let err = g
        .alloc_kv(KvSpec { v_dim: 5, ..latent })
        .err()
        .expect("values longer than keys");
    assert!(err.to_string().contains("values of 5"), "{err}");
    // A value head wider than the kernels accumulate is refused by name, not computed wrong.
    let wide = KvSpec {
        num_blocks: 1,
        v_dim: 600,
        ..spec
    };
    let cache = g.alloc_kv(wide).unwrap();
    let meta = StepMeta::without_ids(
        vec![SeqMeta {
            block_table: vec![0],
            ..meta.seqs[0].clone()
        }],
        meta.block_size,
    );
    let step = g
        .prepare_step(&meta, &rope_table(RopeLayout::Half, 2, 1.0))
        .unwrap();
    let q = g.tensor_from_host(rand_vec(4, 4), 1, 4).unwrap();
    let err = g
        .attention(&q, &cache, &step, &Heads::new(1, 1, 4, 600).params(None))
        .err()
        .expect("v_dim 600 is refused");
    assert!(err.to_string().contains("v_dim over 512"), "{err}");
}

/// The launch counter (`tessera bench` reports launches per step) counts each kernel and each
/// cuBLAS call once.
#[test]
fn launches_are_counted_once_each() {
    let Some(g) = gpu("launches_are_counted_once_each") else {
        return;
    };
    let counter = g.launch_counter();
    let count = || counter.load(std::sync::atomic::Ordering::Relaxed);
    let x = g.tensor_from_host(rand_vec(4 * 64, 1), 4, 64).unwrap();
    let norm = g
        .upload_weight(weight(rand_vec(64, 2), vec![64], DType::F32))
        .unwrap();
    let before = count();
    g.rms_norm(&x, &norm, 1e-6).unwrap();
    assert_eq!(count() - before, 1, "rms_norm: one kernel");
    for (dtype, launches) in [(DType::F32, 1), (DType::BF16, 2)] {
        let w = g
            .upload_weight(weight(rand_vec(8 * 64, 3), vec![8, 64], dtype))
            .unwrap();
        let before = count();
        g.linear(&x, &w, None).unwrap();
        // A 16-bit weight first rounds the activations to its type (to_half), then one GEMM.
        assert_eq!(count() - before, launches, "linear {dtype:?}");
        // Per-head products are one strided-batched GEMM, whatever the head count.
        let heads = g
            .upload_weight(weight(rand_vec(4 * 8 * 16, 4), vec![32, 16], dtype))
            .unwrap();
        let before = count();
        g.head_linear(&x, &heads, 4).unwrap();
        assert_eq!(count() - before, launches, "head_linear {dtype:?}");
    }
}

/// A decode listed before a prompt chunk, block size 4: each context written in full first.
fn decode_first_case<B: Backend>(b: &B, h: Heads) -> Result<Vec<f32>> {
    let Heads { heads, qk, .. } = h;
    let mut cache = b.alloc_kv(h.kv_spec(8, 4))?;
    let rope = rope_table(RopeLayout::Half, 4, 1.0);
    let seqs = |a: (usize, usize), c: (usize, usize)| {
        vec![
            SeqMeta {
                token_start: 0,
                num_tokens: a.0,
                context_len: a.1,
                block_table: vec![5, 2],
            },
            SeqMeta {
                token_start: a.0,
                num_tokens: c.0,
                context_len: c.1,
                block_table: vec![1, 7],
            },
        ]
    };
    let fill = StepMeta::without_ids(seqs((6, 6), (8, 8)), 4);
    let step = b.prepare_step(&fill, &rope)?;
    h.write(b, &mut cache, &step, (14, 60))?;
    let meta = StepMeta::without_ids(seqs((1, 6), (4, 8)), 4);
    let step = b.prepare_step(&meta, &rope)?;
    let q = b.tensor_from_host(rand_vec(5 * heads * qk, 61), 5, heads * qk)?;
    b.tensor_to_host(&b.attention(&q, &cache, &step, &h.params(None))?)
}

#[test]
fn decode_before_chunk_matches_cpu() {
    for h in HEAD_LAYOUTS {
        same_case!(&format!("decode first {h:?}"), 1e-4, decode_first_case, h);
    }
}

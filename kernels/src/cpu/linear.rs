//! Matrix multiplication `x · Wᵀ` with f32 activations and weights in their stored dtype.
//!
//! Decode is bound by memory bandwidth, so the kernel streams every weight row exactly once per
//! call, whatever the number of tokens. Rows are spread over the rayon pool in chunks big enough to
//! amortise scheduling, and each chunk runs one of two implementations, chosen once per process
//! ([`Isa::best`]):
//!
//! - x86-64 with AVX2, FMA and F16C (detected at run time; the binary itself targets baseline
//!   x86-64): `simd_x86` widens bf16/f16/f32 weights to f32 in registers and multiplies a block of
//!   weight rows by a block of token rows at once;
//! - everywhere else, the portable path: each row is widened to f32 once (into a per-thread buffer,
//!   no allocation per call) and then dotted with every token's activations.
//!
//! `TESSERA_CPU_KERNELS=portable` forces the portable path (for comparison and debugging).

use std::cell::RefCell;
use std::sync::LazyLock;

use rayon::prelude::*;

use crate::WeightView;

thread_local! {
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The implementation `linear` runs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Isa {
    /// Plain Rust, autovectorised for the compile target.
    Portable,
    /// AVX2 + FMA + F16C; the value is the proof that the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2(super::simd_x86::Avx2),
}

impl Isa {
    /// The fastest implementation this CPU supports, detected on first use.
    pub(crate) fn best() -> Isa {
        static BEST: LazyLock<Isa> = LazyLock::new(|| {
            if std::env::var("TESSERA_CPU_KERNELS").is_ok_and(|v| v == "portable") {
                return Isa::Portable;
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(a) = super::simd_x86::Avx2::detect() {
                return Isa::Avx2(a);
            }
            Isa::Portable
        });
        *BEST
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => "avx2+fma+f16c",
        }
    }
}

/// Dot product with eight independent accumulators, so the compiler can keep them in SIMD lanes.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `out[n, t] = Σ_k x[t, k] · w[n, k]` for the weight rows `rows`, written transposed
/// (row-of-weight major) into `out`.
fn rows_times_x(
    isa: Isa,
    w: &WeightView<'_>,
    rows: std::ops::Range<usize>,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Isa::Avx2(a) = isa {
        match w {
            WeightView::F32(v) => a.rows(v, rows, x, k, out),
            WeightView::F16(v) => a.rows(v, rows, x, k, out),
            WeightView::BF16(v) => a.rows(v, rows, x, k, out),
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let Isa::Portable = isa;
    rows_times_x_portable(w, rows, x, k, out)
}

fn rows_times_x_portable(
    w: &WeightView<'_>,
    rows: std::ops::Range<usize>,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let t = x.len() / k;
    match w {
        WeightView::F32(v) => {
            for (i, n) in rows.enumerate() {
                let wr = &v[n * k..(n + 1) * k];
                for (tt, xr) in x.chunks_exact(k).enumerate() {
                    out[i * t + tt] = dot(xr, wr);
                }
            }
        }
        _ => ROW.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(k, 0.0);
            for (i, n) in rows.enumerate() {
                w.convert_into(n * k, &mut buf);
                for (tt, xr) in x.chunks_exact(k).enumerate() {
                    out[i * t + tt] = dot(xr, &buf);
                }
            }
        }),
    }
}

/// Weight rows per rayon task: enough work (~1M multiply-adds; 2 MiB of bf16 weights at
/// batch 1) that scheduling is noise, yet at least four tasks per thread when `n` allows, so the
/// threads finish together. A multiple of 12 keeps the SIMD register blocks (4 or 3 rows) full.
fn rows_per_task(n: usize, k: usize, t: usize) -> usize {
    let by_work = (1 << 20) / (k * t).max(1);
    let by_balance = n.div_ceil(4 * rayon::current_num_threads());
    by_work.min(by_balance).clamp(1, 1024).next_multiple_of(12)
}

/// `y[t, n] = Σ_k x[t, k] · w[n, k] (+ bias[n])` for `x: [t, k]`, `w: [n, k]`.
pub(crate) fn linear(
    x: &[f32],
    k: usize,
    w: WeightView<'_>,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    linear_with(Isa::best(), x, k, w, n, bias)
}

/// [`linear`] on a chosen implementation.
pub(crate) fn linear_with(
    isa: Isa,
    x: &[f32],
    k: usize,
    w: WeightView<'_>,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let t = x.len() / k;
    if t == 0 || n == 0 {
        return Vec::new();
    }
    let rows_per_task = rows_per_task(n, k, t);
    let mut out_t = vec![0f32; n * t];
    out_t
        .par_chunks_mut(rows_per_task * t)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = c * rows_per_task;
            let end = (start + rows_per_task).min(n);
            rows_times_x(isa, &w, start..end, x, k, chunk);
        });
    let mut y = if t == 1 {
        out_t
    } else {
        let mut y = vec![0f32; t * n];
        for (nn, col) in out_t.chunks_exact(t).enumerate() {
            for (tt, v) in col.iter().enumerate() {
                y[tt * n + nn] = *v;
            }
        }
        y
    };
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(n) {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn naive(x: &[f32], k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let t = x.len() / k;
        let mut y = vec![0f32; t * n];
        for tt in 0..t {
            for nn in 0..n {
                y[tt * n + nn] = (0..k).map(|i| x[tt * k + i] * w[nn * k + i]).sum();
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn f32_matches_naive_for_odd_shapes() {
        for (t, k, n) in [(1, 7, 5), (3, 33, 17), (5, 64, 300)] {
            let x = data(t * k, 1);
            let w = data(n * k, 2);
            let got = linear(&x, k, WeightView::F32(&w), n, None);
            let want = naive(&x, k, &w, n);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{t}x{k}x{n}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn bf16_weights_match_upcast_reference_and_bias_adds() {
        let (t, k, n) = (2, 40, 9);
        let x = data(t * k, 3);
        let w: Vec<bf16> = data(n * k, 4).into_iter().map(bf16::from_f32).collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let got = linear(&x, k, WeightView::BF16(&w), n, Some(&bias));
        let want = naive(&x, k, &wf, n);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!((g - (e + (i % n) as f32)).abs() < 1e-4);
        }
    }

    /// Every implementation this machine can run: the portable one always, plus the detected one.
    fn isas() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        let simd = crate::cpu::simd_x86::Avx2::detect().map(Isa::Avx2);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = None;
        std::iter::once(Isa::Portable).chain(simd).collect()
    }

    /// Weights of every dtype with the same values (exactly representable in f16 and bf16).
    fn weights(len: usize, seed: u32) -> (Vec<f32>, Vec<f16>, Vec<bf16>) {
        let w: Vec<f32> = data(len, seed)
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .map(|v| f16::from_f32(v).to_f32())
            .collect();
        let h = w.iter().map(|v| f16::from_f32(*v)).collect();
        let b = w.iter().map(|v| bf16::from_f32(*v)).collect();
        (w, h, b)
    }

    /// Checks `got` against an f64 reference, to f32 rounding of the sum of |terms|.
    fn check_f64(what: &str, got: &[f32], x: &[f32], k: usize, w: &[f32], n: usize) {
        let t = x.len() / k;
        assert_eq!(got.len(), t * n, "{what}: output length");
        for tt in 0..t {
            for nn in 0..n {
                let terms = (0..k).map(|i| x[tt * k + i] as f64 * w[nn * k + i] as f64);
                let want: f64 = terms.clone().sum();
                let scale: f64 = terms.map(f64::abs).sum();
                let g = got[tt * n + nn] as f64;
                assert!(
                    (g - want).abs() <= 1e-6 * (scale + 1.0),
                    "{what}: y[{tt}, {nn}] = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn every_isa_and_dtype_matches_f64_reference_for_odd_shapes() {
        let mut cases = 0;
        for isa in isas() {
            for t in 1..=7 {
                for k in [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257] {
                    for n in [1, 2, 3, 5, 6, 17] {
                        let x = data(t * k, 11 + t as u32);
                        let (w, h, b) = weights(n * k, 7 * k as u32 + n as u32);
                        for (name, view) in [
                            ("f32", WeightView::F32(&w)),
                            ("f16", WeightView::F16(&h)),
                            ("bf16", WeightView::BF16(&b)),
                        ] {
                            let got = linear_with(isa, &x, k, view, n, None);
                            check_f64(&format!("{isa:?} {name} {t}x{k}x{n}"), &got, &x, k, &w, n);
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases >= 7 * 13 * 6 * 3);
    }

    #[test]
    fn every_isa_matches_f64_reference_across_many_tasks() {
        // Several rayon tasks, partial register blocks, several k-slices and token tiles.
        for isa in isas() {
            for (t, k, n) in [
                (1, 1000, 1001),
                (5, 301, 997),
                (16, 2048, 70),
                (17, 4100, 37),
            ] {
                let x = data(t * k, 5);
                let (w, h, b) = weights(n * k, 6);
                for (name, view) in [
                    ("f32", WeightView::F32(&w)),
                    ("f16", WeightView::F16(&h)),
                    ("bf16", WeightView::BF16(&b)),
                ] {
                    let got = linear_with(isa, &x, k, view, n, None);
                    check_f64(&format!("{isa:?} {name} {t}x{k}x{n}"), &got, &x, k, &w, n);
                }
            }
        }
    }

    #[test]
    fn no_tokens_or_no_outputs_give_an_empty_result() {
        let w = data(12, 1);
        for isa in isas() {
            assert!(linear_with(isa, &[], 4, WeightView::F32(&w), 3, None).is_empty());
            assert!(linear_with(isa, &data(8, 2), 4, WeightView::F32(&[]), 0, None).is_empty());
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn best_is_the_simd_path_when_the_cpu_has_it() {
        let forced = std::env::var("TESSERA_CPU_KERNELS").is_ok_and(|v| v == "portable");
        if crate::cpu::simd_x86::Avx2::detect().is_some() && !forced {
            assert!(matches!(Isa::best(), Isa::Avx2(_)));
        } else {
            assert!(matches!(Isa::best(), Isa::Portable));
        }
    }
}

//! Matrix multiplication `x · Wᵀ` with f32 activations and weights in their stored dtype.
//!
//! Decode is bound by memory bandwidth, so the kernel streams every weight row exactly once per
//! call, whatever the number of tokens. Rows are spread over the rayon pool in chunks big enough to
//! amortise scheduling, and each chunk runs one of three implementations, chosen once per process
//! ([`Isa::best`]):
//!
//! - x86-64 with AVX-512F, or with AVX2, FMA and F16C (detected at run time; the binary itself
//!   targets baseline x86-64): `simd_x86` widens bf16/f16/f32 weights to f32 in registers and
//!   multiplies a block of weight rows by a block of token rows at once;
//! - everywhere else, the portable path: each row is widened to f32 once (into a reused per-thread
//!   buffer) and then dotted with every token's activations.
//!
//! `TESSERA_CPU_KERNELS=portable` (or `avx2`) forces that path, for comparison and debugging.
//!
//! A parallel region costs a fixed ~5–15 µs of thread hand-off, as much as streaming a few hundred
//! kilobytes, so small products (a router, a tiny model's projections) run on the calling thread,
//! and [`linear_many`] runs several projections of the same input (q, k and v) as one region.

use std::ops::Range;
use std::sync::LazyLock;

use rayon::prelude::*;

use super::{pool, scratch};
use crate::WeightView;

/// The implementation `linear` runs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Isa {
    /// Plain Rust, autovectorised for the compile target.
    Portable,
    /// AVX2 + FMA + F16C; the value is the proof that the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2(super::simd_x86::Avx2),
    /// AVX-512F; the value is the proof that the CPU has it.
    #[cfg(target_arch = "x86_64")]
    Avx512(super::simd_x86::Avx512),
}

impl Isa {
    /// The fastest implementation this CPU supports (or the one `TESSERA_CPU_KERNELS` names, if the
    /// CPU supports it), detected on first use.
    pub(crate) fn best() -> Isa {
        static BEST: LazyLock<Isa> = LazyLock::new(|| {
            let forced = std::env::var("TESSERA_CPU_KERNELS").unwrap_or_default();
            if forced == "portable" {
                return Isa::Portable;
            }
            #[cfg(target_arch = "x86_64")]
            {
                use super::simd_x86::{Avx2, Avx512};
                if forced != "avx2"
                    && let Some(a) = Avx512::detect()
                {
                    return Isa::Avx512(a);
                }
                if let Some(a) = Avx2::detect() {
                    return Isa::Avx2(a);
                }
            }
            Isa::Portable
        });
        *BEST
    }

    /// Runs `iters` rounds of twelve independent vector multiply-adds and returns the FLOPs done
    /// (the compute-roof probe); `None` for the portable path, which has no such loop.
    pub(crate) fn fma_flops(self, iters: usize) -> Option<f64> {
        match self {
            Isa::Portable => None,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(a) => Some(a.fma_flops(iters)),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(a) => Some(a.fma_flops(iters)),
        }
    }

    /// f32 lanes per vector of the SIMD kernels; `None` for the portable path.
    pub(crate) fn lanes(self) -> Option<usize> {
        match self {
            Isa::Portable => None,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => Some(8),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => Some(16),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => "avx2+fma+f16c",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => "avx512f",
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

/// A weight matrix, or a window of its columns: row `r` is elements
/// `offset + r·stride .. offset + r·stride + k` of `w` (`k` is the activations' width).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub w: WeightView<'a>,
    pub offset: usize,
    pub stride: usize,
}

impl<'a> Mat<'a> {
    /// A whole `[_, k]` matrix.
    pub(crate) fn full(w: WeightView<'a>, k: usize) -> Self {
        Mat {
            w,
            offset: 0,
            stride: k,
        }
    }
}

/// Tokens from which a product is bound by arithmetic rather than memory, and the SIMD kernels
/// take the activations transposed ([`Acts::xt`]) to put tokens in vector lanes.
pub(crate) const BATCHED_FROM_TOKENS: usize = 8;

/// The activations of a product: `t = x.len() / k` token rows of `k` features.
#[derive(Clone, Copy)]
pub(crate) struct Acts<'a> {
    /// Token-major `[t, k]`.
    pub x: &'a [f32],
    pub k: usize,
    /// The same, feature-major, for the SIMD kernels' batched path; built by [`rows_times_x`]
    /// when absent, so callers that run many products of one input build it once instead.
    pub xt: Option<Transposed<'a>>,
}

/// Activations feature-major: `data[c · tp + j]` is feature `c` of token `j`, zero for `j ≥ t`.
#[derive(Clone, Copy)]
pub(crate) struct Transposed<'a> {
    pub data: &'a [f32],
    /// Tokens rounded up to whole vectors.
    pub tp: usize,
}

impl<'a> Acts<'a> {
    /// Token-major activations only.
    pub(crate) fn rows(x: &'a [f32], k: usize) -> Self {
        Acts { x, k, xt: None }
    }

    fn tokens(&self) -> usize {
        self.x.len() / self.k.max(1)
    }

    /// Whether `isa` runs these activations through the batched kernel (and so wants them
    /// transposed into vectors of its lane count).
    fn batched_lanes(&self, isa: Isa) -> Option<usize> {
        isa.lanes().filter(|_| self.tokens() >= BATCHED_FROM_TOKENS)
    }
}

impl<'a> Transposed<'a> {
    /// `x` (`[t, k]`) feature-major in `buf` (resized), tokens padded to whole vectors of `lanes`.
    pub(crate) fn build(x: &[f32], k: usize, lanes: usize, buf: &'a mut Vec<f32>) -> Self {
        let t = x.len() / k.max(1);
        let tp = t.next_multiple_of(lanes);
        buf.clear();
        buf.resize(k * tp, 0.0);
        for (j, row) in x.chunks_exact(k).enumerate() {
            for (c, v) in row.iter().enumerate() {
                buf[c * tp + j] = *v;
            }
        }
        Transposed { data: buf, tp }
    }
}

/// `out[i·t + j] = Σ_c x[j, c] · row(rows.start + i)[c]` for the weight rows `rows` and every token
/// `j < t = x.len() / k`: written transposed (weight-row major), on the calling thread.
pub(crate) fn rows_times_x(isa: Isa, m: Mat<'_>, rows: Range<usize>, a: Acts<'_>, out: &mut [f32]) {
    if a.xt.is_none()
        && let Some(lanes) = a.batched_lanes(isa)
    {
        return scratch::with_buf(|buf| {
            let xt = Some(Transposed::build(a.x, a.k, lanes, buf));
            rows_times_x(isa, m, rows, Acts { xt, ..a }, out)
        });
    }
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd_x86::Rows;
        let (o, s, r) = (m.offset, m.stride, rows.clone());
        macro_rules! run {
            ($isa:expr) => {
                match m.w {
                    WeightView::F32(v) => $isa.rows(Rows::new(&v[o..], s, r), a, out),
                    WeightView::F16(v) => $isa.rows(Rows::new(&v[o..], s, r), a, out),
                    WeightView::BF16(v) => $isa.rows(Rows::new(&v[o..], s, r), a, out),
                }
            };
        }
        match isa {
            Isa::Avx2(i) => return run!(i),
            Isa::Avx512(i) => return run!(i),
            Isa::Portable => {}
        }
    }
    rows_times_x_portable(m, rows, a.x, a.k, out)
}

/// `out[g·vd + c] += Σ_{i<n} p[g·ps + i] · v[i·vs + c]` for `g < group`, `c < vd`: attention's
/// probability-weighted sum of `n` value rows `vs` apart (more than `vd` when the values are
/// the start of longer key rows), for a group of query heads.
#[derive(Clone, Copy)]
pub(crate) struct Pv<'a> {
    pub p: &'a [f32],
    pub ps: usize,
    pub group: usize,
    pub v: &'a [f32],
    pub n: usize,
    pub vd: usize,
    pub vs: usize,
}

impl Pv<'_> {
    /// Asserts the bounds every implementation relies on.
    pub(crate) fn check(&self, out: &[f32]) {
        assert!(
            self.vs >= self.vd,
            "value rows {} apart of {}",
            self.vs,
            self.vd
        );
        if self.n > 0 {
            assert!(
                (self.n - 1) * self.vs + self.vd <= self.v.len(),
                "v too short"
            );
            if self.group > 0 {
                assert!(
                    (self.group - 1) * self.ps + self.n <= self.p.len(),
                    "p too short"
                );
            }
        }
        assert!(self.group * self.vd <= out.len(), "out too short");
    }
}

/// Accumulates [`Pv`] into `out`.
pub(crate) fn pv_accumulate(isa: Isa, a: Pv<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx2(s) => return s.pv(a, out),
        Isa::Avx512(s) => return s.pv(a, out),
        Isa::Portable => {}
    }
    a.check(out);
    for i in 0..a.n {
        let row = &a.v[i * a.vs..][..a.vd];
        for (g, o) in out.chunks_exact_mut(a.vd).take(a.group).enumerate() {
            let w = a.p[g * a.ps + i];
            for (o, v) in o.iter_mut().zip(row) {
                *o += w * v;
            }
        }
    }
}

/// `ln Σ e^x`, computed as `max + ln Σ e^(x - max)` so nothing overflows (`-inf` if empty).
pub(crate) fn log_sum_exp(isa: Isa, xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(s) => s.sum_exp(xs, max),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(s) => s.sum_exp(xs, max),
        Isa::Portable => {
            // Eight partial sums, so the adds are not one serial chain.
            let mut acc = [0f32; 8];
            for (i, v) in xs.iter().enumerate() {
                acc[i % 8] += (v - max).exp();
            }
            acc.iter().sum()
        }
    };
    max + sum.ln()
}

/// `xs ← exp(xs - max) / Σ exp(xs - max)`.
pub(crate) fn softmax_in_place(isa: Isa, xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx2(s) => return s.softmax(xs),
        Isa::Avx512(s) => return s.softmax(xs),
        Isa::Portable => {}
    }
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in xs.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    xs.iter_mut().for_each(|v| *v /= sum);
}

fn rows_times_x_portable(m: Mat<'_>, rows: Range<usize>, x: &[f32], k: usize, out: &mut [f32]) {
    let t = x.len() / k;
    let start = |n: usize| m.offset + n * m.stride;
    match m.w {
        WeightView::F32(v) => {
            for (i, n) in rows.enumerate() {
                let wr = &v[start(n)..start(n) + k];
                for (tt, xr) in x.chunks_exact(k).enumerate() {
                    out[i * t + tt] = dot(xr, wr);
                }
            }
        }
        w => scratch::with_zeroed(k, |buf| {
            for (i, n) in rows.enumerate() {
                w.convert_into(start(n), buf);
                for (tt, xr) in x.chunks_exact(k).enumerate() {
                    out[i * t + tt] = dot(xr, buf);
                }
            }
        }),
    }
}

/// Multiply-adds below which a product runs on the calling thread: about 256 KiB of bf16 weights at
/// batch 1, which streams in roughly the time a parallel region costs.
const INLINE_WORK: usize = 1 << 17;

/// Whether work of `macs` multiply-adds is worth a parallel region.
pub(crate) fn worth_parallel(macs: usize) -> bool {
    macs >= INLINE_WORK && rayon::current_num_threads() > 1
}

/// Weight rows per rayon task: enough work (~1M multiply-adds; 2 MiB of bf16 weights at
/// batch 1) that scheduling is noise, yet at least four tasks per thread when `n` allows, so the
/// threads finish together. A multiple of 12 keeps the SIMD register blocks (4 or 3 rows) full.
fn rows_per_task(n: usize, k: usize, t: usize) -> usize {
    let by_work = (1 << 20) / (k * t).max(1);
    let by_balance = n.div_ceil(4 * rayon::current_num_threads());
    by_work.min(by_balance).clamp(1, 1024).next_multiple_of(12)
}

/// One projection of a [`linear_many`] call: `w` is `[n, k]`.
#[derive(Clone, Copy)]
pub(crate) struct Proj<'a> {
    pub w: WeightView<'a>,
    pub n: usize,
    pub bias: Option<&'a [f32]>,
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
    let mut out = linear_many(isa, x, k, &[Proj { w, n, bias }]);
    out.pop().unwrap_or_default()
}

/// Several products of the same `x: [t, k]`, as one parallel region: `[x · W_iᵀ (+ b_i)]`.
pub(crate) fn linear_many(isa: Isa, x: &[f32], k: usize, projs: &[Proj<'_>]) -> Vec<Vec<f32>> {
    let t = x.len() / k.max(1);
    let total_n: usize = projs.iter().map(|p| p.n).sum();
    // Weight-row-major results, one per projection.
    let mut outs_t: Vec<Vec<f32>> = projs.iter().map(|p| pool::zeroed(p.n * t)).collect();
    if t > 0 && total_n > 0 {
        // Transposed once here rather than by every task.
        let mut xt_buf = Vec::new();
        let mut a = Acts::rows(x, k);
        if let Some(lanes) = a.batched_lanes(isa) {
            xt_buf = pool::zeroed(k * t.next_multiple_of(lanes));
            a.xt = Some(Transposed::build(x, k, lanes, &mut xt_buf));
        }
        if worth_parallel(total_n * k * t) {
            let rows = rows_per_task(total_n, k, t);
            let mut tasks = Vec::with_capacity(total_n.div_ceil(rows) + projs.len());
            for (p, out) in projs.iter().zip(outs_t.iter_mut()) {
                for (c, chunk) in out.chunks_mut(rows * t).enumerate() {
                    let start = c * rows;
                    tasks.push((p, start..(start + rows).min(p.n), chunk));
                }
            }
            tasks
                .into_par_iter()
                .for_each(|(p, r, chunk)| rows_times_x(isa, Mat::full(p.w, k), r, a, chunk));
        } else {
            for (p, out) in projs.iter().zip(outs_t.iter_mut()) {
                rows_times_x(isa, Mat::full(p.w, k), 0..p.n, a, out);
            }
        }
        pool::give(xt_buf);
    }
    projs
        .iter()
        .zip(outs_t)
        .map(|(p, out_t)| {
            let mut y = if t <= 1 {
                out_t
            } else {
                let mut y = pool::zeroed(t * p.n);
                for (nn, col) in out_t.chunks_exact(t).enumerate() {
                    for (tt, v) in col.iter().enumerate() {
                        y[tt * p.n + nn] = *v;
                    }
                }
                pool::give(out_t);
                y
            };
            if let Some(b) = p.bias {
                for row in y.chunks_exact_mut(p.n) {
                    for (v, bb) in row.iter_mut().zip(b) {
                        *v += bb;
                    }
                }
            }
            y
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
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
    pub(crate) fn isas() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::simd_x86::{Avx2, Avx512};
            out.extend(Avx2::detect().map(Isa::Avx2));
            out.extend(Avx512::detect().map(Isa::Avx512));
        }
        out
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
                (40, 300, 50),
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
    fn best_is_the_widest_simd_path_the_cpu_has() {
        use crate::cpu::simd_x86::{Avx2, Avx512};
        let forced = std::env::var("TESSERA_CPU_KERNELS").unwrap_or_default();
        let best = Isa::best();
        if forced == "portable" || Avx2::detect().is_none() {
            assert!(matches!(best, Isa::Portable));
        } else if forced != "avx2" && Avx512::detect().is_some() {
            assert!(matches!(best, Isa::Avx512(_)));
        } else {
            assert!(matches!(best, Isa::Avx2(_)));
        }
    }

    #[test]
    fn column_windows_match_the_reference() {
        // Rows of a [n, wide] matrix restricted to columns c0..c0 + k (the MoE's down slices).
        for isa in isas() {
            for (t, n, wide, c0, k) in [
                (1, 9, 40, 3, 17),
                (2, 16, 64, 32, 32),
                (5, 7, 300, 100, 161),
                // The batched kernel: partial token vectors, a partial row block, k slices.
                (11, 13, 700, 40, 600),
                (24, 6, 64, 0, 64),
            ] {
                let x = data(t * k, 21);
                let (w, h, b) = weights(n * wide, 22);
                let window: Vec<f32> = (0..n)
                    .flat_map(|r| w[r * wide + c0..r * wide + c0 + k].to_vec())
                    .collect();
                for (name, view) in [
                    ("f32", WeightView::F32(&w)),
                    ("f16", WeightView::F16(&h)),
                    ("bf16", WeightView::BF16(&b)),
                ] {
                    let m = Mat {
                        w: view,
                        offset: c0,
                        stride: wide,
                    };
                    let mut got_t = vec![0f32; n * t];
                    rows_times_x(isa, m, 0..n, Acts::rows(&x, k), &mut got_t);
                    let got: Vec<f32> = (0..t)
                        .flat_map(|j| (0..n).map(move |r| (r, j)))
                        .map(|(r, j)| got_t[r * t + j])
                        .collect();
                    check_f64(
                        &format!("{isa:?} {name} window {t}x{n}x{k}"),
                        &got,
                        &x,
                        k,
                        &window,
                        n,
                    );
                }
            }
        }
    }

    #[test]
    fn pv_and_softmax_match_the_portable_path() {
        for isa in isas() {
            // (group, vd, n, extra columns between value rows)
            for (group, vd, n, gap) in [
                (8, 128, 16, 0),
                (5, 20, 7, 0),
                (1, 3, 1, 0),
                (12, 64, 3, 0),
                (4, 24, 5, 8),
                (3, 13, 6, 3),
            ] {
                let ps = n + 3;
                let probs = data(group * ps, 41);
                let vs = vd + gap;
                let values = data(n * vs, 42);
                let mut got = data(group * vd, 43);
                let mut want = got.clone();
                let a = Pv {
                    p: &probs,
                    ps,
                    group,
                    v: &values,
                    n,
                    vd,
                    vs,
                };
                pv_accumulate(isa, a, &mut got);
                // The reference by the definition, not through any kernel.
                for g in 0..group {
                    for c in 0..vd {
                        for i in 0..n {
                            want[g * vd + c] += probs[g * ps + i] * values[i * vs + c];
                        }
                    }
                }
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{isa:?} pv {group}x{vd}x{n} rows {vs} apart: {g} vs {w}"
                    );
                }
            }
            for len in [1, 7, 8, 33, 300, 32768] {
                // Logits spanning ±40 around an offset: exponentials from ~1 down to underflow.
                let xs: Vec<f32> = data(len, 44).iter().map(|v| 40.0 * v + 3.0).collect();
                let (mut got, mut want) = (xs.clone(), xs.clone());
                softmax_in_place(isa, &mut got);
                softmax_in_place(Isa::Portable, &mut want);
                for (g, w) in got.iter().zip(&want) {
                    // Both sides sum in f32, in different orders: ~1e-5 relative over 32k terms.
                    assert!(
                        (g - w).abs() <= 2e-5 * w.max(1e-30) + 1e-37,
                        "{isa:?} softmax {len}: {g} vs {w}"
                    );
                }
                assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                let (l, lp) = (log_sum_exp(isa, &xs), log_sum_exp(Isa::Portable, &xs));
                assert!(
                    (l - lp).abs() <= 1e-5 * lp.abs().max(1.0),
                    "{isa:?} lse {len}: {l} vs {lp}"
                );
            }
        }
    }

    #[test]
    fn linear_many_matches_separate_products_and_adds_biases() {
        for isa in isas() {
            for t in [1, 3, 16] {
                let k = 256;
                let x = data(t * k, 31);
                let (wq, _, bq) = weights(600 * k, 32);
                let (wk, _, bk) = weights(100 * k, 33);
                let bias: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
                let outs = linear_many(
                    isa,
                    &x,
                    k,
                    &[
                        Proj {
                            w: WeightView::BF16(&bq),
                            n: 600,
                            bias: None,
                        },
                        Proj {
                            w: WeightView::BF16(&bk),
                            n: 100,
                            bias: Some(&bias),
                        },
                    ],
                );
                assert_eq!(outs.len(), 2);
                check_f64(&format!("{isa:?} many q t{t}"), &outs[0], &x, k, &wq, 600);
                let unbiased: Vec<f32> = outs[1]
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v - bias[i % 100])
                    .collect();
                check_f64(&format!("{isa:?} many k t{t}"), &unbiased, &x, k, &wk, 100);
            }
        }
    }
}

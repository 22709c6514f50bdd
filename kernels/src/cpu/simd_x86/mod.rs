//! x86-64 SIMD kernels for [`super::linear`] and attention: AVX2+FMA+F16C and AVX-512F, chosen
//! at run time.
//!
//! Weights are widened to f32 in registers as they are loaded (bf16: zero-extend and shift;
//! f16: `vcvtph2ps`; f32: as is), so nothing is written back to memory. A register block of `R`
//! weight rows × `T` token rows keeps `R·T` independent accumulators: each loaded weight vector
//! feeds `T` multiply-adds and each activation vector `R`: [`matmul`] for decode's few tokens,
//! [`batched`] for many.
//!
//! Both instruction sets run the same generic code ([`vector::Simd`] supplies the vector type and
//! its handful of operations). The generic functions are `#[inline(always)]` and are only ever
//! called from the `#[target_feature]` entry points that [`isa_kernels!`] writes for each set, so
//! each instantiation is compiled inside, and for, its instruction set.

#![cfg(target_arch = "x86_64")]

mod batched;
mod matmul;
mod vector;

use std::arch::x86_64::*;
use std::ops::Range;

use batched::Batched;
use matmul::{Panel, rows_generic};

use super::linear::{Acts, Pv};
pub(crate) use vector::Elem;
use vector::{Avx2Ops, Avx512Ops, Simd};

/// Proof that this CPU has AVX2, FMA and F16C: only [`Avx2::detect`] makes one, so holding one is
/// what makes calling the `#[target_feature]` kernels below sound.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2 {
    _detected: (),
}

/// Proof that this CPU has AVX-512F (and AVX2, FMA, F16C, which every AVX-512 CPU has).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512 {
    _detected: (),
}

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2 { _detected: () })
    }
}

/// Independent accumulator chains of the peak probe: more than FMA latency × FMA units (4 × 2 on
/// current cores), so the units, not the dependency chains, are the limit.
const FMA_CHAINS: usize = 12;

/// The peak-throughput loop for `S`: only register operands.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`.
#[inline(always)]
unsafe fn fma_loop<S: Simd>(iters: usize) -> f32 {
    // SAFETY: register-only intrinsics of `S`, enabled by the caller.
    unsafe {
        let ones = [1.0f32; 16];
        let a = S::load(ones.as_ptr());
        let b = S::load(ones.as_ptr());
        let mut acc = [S::zero(); FMA_CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = S::fma(a, b, *v);
            }
        }
        acc.iter().map(|v| S::hsum(*v)).sum()
    }
}

impl Avx512 {
    pub(crate) fn detect() -> Option<Self> {
        (Avx2::detect().is_some() && is_x86_feature_detected!("avx512f"))
            .then_some(Avx512 { _detected: () })
    }
}

/// For one instruction set: the public kernels of its proof type `$isa`, and the
/// `#[target_feature]` entry points (in module `$entry`) that compile the generic bodies with
/// `$ops` for it. Both instruction sets get exactly the same code this way.
macro_rules! isa_kernels {
    ($isa:ident, $ops:ident, $entry:ident, $features:literal) => {
        impl $isa {
            /// [`Rows`] times the activations `a`, into `out` (weight-row major): the batched
            /// kernel when `a` comes transposed too, else the decode one.
            pub(crate) fn rows<W: Elem>(self, m: Rows<'_, W>, a: Acts<'_>, out: &mut [f32]) {
                let t = m.check(a.x, a.k, out);
                match a.xt {
                    Some(xt) => {
                        assert!(
                            xt.tp >= t
                                && xt.tp.is_multiple_of($ops::LANES)
                                && xt.data.len() >= a.k * xt.tp,
                            "transposed activations of {} for [{t}, {}]",
                            xt.data.len(),
                            a.k
                        );
                        let b = Batched {
                            w: m.first_row(),
                            ws: m.stride,
                            nr: m.rows.len(),
                            k: a.k,
                            xt: xt.data.as_ptr(),
                            tp: xt.tp,
                            t,
                            out: out.as_mut_ptr(),
                        };
                        // SAFETY: `self` exists only after the instruction set was detected;
                        // `check` and the assertion above establish the bounds `batched` needs.
                        unsafe { $entry::batched(b) }
                    }
                    None => {
                        let whole = Panel {
                            w: m.first_row(),
                            ws: m.stride,
                            x: a.x.as_ptr(),
                            xs: a.k,
                            len: a.k,
                            out: out.as_mut_ptr(),
                            os: t,
                        };
                        // SAFETY: as above; `check` asserted exactly the bounds `rows_generic`
                        // requires.
                        unsafe { $entry::rows(whole, m.rows.len(), t) }
                    }
                }
            }

            /// [`Pv`] with this instruction set.
            pub(crate) fn pv(self, a: Pv<'_>, out: &mut [f32]) {
                a.check(out);
                let ptrs = PvPtrs {
                    p: a.p.as_ptr(),
                    ps: a.ps,
                    v: a.v.as_ptr(),
                    n: a.n,
                    vd: a.vd,
                    vs: a.vs,
                    out: out.as_mut_ptr(),
                };
                // SAFETY: `self` proves the instruction set; `check` asserted the bounds
                // `pv_generic` needs.
                unsafe { $entry::pv(ptrs, a.group) }
            }

            /// `iters` rounds of [`FMA_CHAINS`] independent multiply-adds; returns the FLOPs done.
            pub(crate) fn fma_flops(self, iters: usize) -> f64 {
                // SAFETY: `self` proves the instruction set.
                let sink = unsafe { $entry::fma_loop(iters) };
                std::hint::black_box(sink);
                (iters * FMA_CHAINS * $ops::LANES * 2) as f64
            }
        }

        mod $entry {
            use super::*;

            /// # Safety
            /// The CPU has the instruction set; otherwise as [`rows_generic`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows<W: Elem>(whole: Panel<W>, nr: usize, t: usize) {
                // SAFETY: forwarded from the caller.
                unsafe { rows_generic::<$ops, W>(whole, nr, t) }
            }

            /// # Safety
            /// The CPU has the instruction set; otherwise as [`batched::batched`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn batched<W: Elem>(b: Batched<W>) {
                // SAFETY: forwarded from the caller.
                unsafe { super::batched::batched::<$ops, W>(b) }
            }

            /// # Safety
            /// The CPU has the instruction set; otherwise as [`pv_generic`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn pv(a: PvPtrs, group: usize) {
                // SAFETY: forwarded from the caller.
                unsafe { pv_generic::<$ops>(a, group) }
            }

            /// # Safety
            /// The CPU has the instruction set.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn fma_loop(iters: usize) -> f32 {
                // SAFETY: forwarded from the caller.
                unsafe { super::fma_loop::<$ops>(iters) }
            }
        }
    };
}

isa_kernels!(Avx2, Avx2Ops, avx2_entry, "avx2,fma,f16c");
isa_kernels!(Avx512, Avx512Ops, avx512_entry, "avx512f,avx2,fma,f16c");

impl Avx2 {
    /// `xs ← softmax(xs)`, exponentials eight at a time.
    pub(crate) fn softmax(self, xs: &mut [f32]) {
        // SAFETY: `self` proves AVX2 and FMA; the slice bounds every access.
        unsafe { softmax_avx2(xs) }
    }

    /// `Σ e^(x - max)`, exponentials eight at a time.
    pub(crate) fn sum_exp(self, xs: &[f32], max: f32) -> f32 {
        // SAFETY: `self` proves AVX2 and FMA; the slice bounds every access.
        unsafe { sum_exp_avx2(xs, max) }
    }
}

impl Avx512 {
    /// `xs ← softmax(xs)` (the AVX2 code: a CPU with AVX-512F has AVX2 too).
    pub(crate) fn softmax(self, xs: &mut [f32]) {
        Avx2 { _detected: () }.softmax(xs)
    }

    /// `Σ e^(x - max)` (the AVX2 code).
    pub(crate) fn sum_exp(self, xs: &[f32], max: f32) -> f32 {
        Avx2 { _detected: () }.sum_exp(xs, max)
    }
}

/// [`Pv`] on raw pointers, for `G` heads from `p` and `out` on: `out[g·vd + c] +=
/// Σ_{i<n} p[g·ps + i] · v[i·vs + c]`.
#[derive(Clone, Copy)]
struct PvPtrs {
    p: *const f32,
    ps: usize,
    v: *const f32,
    n: usize,
    vd: usize,
    vs: usize,
    out: *mut f32,
}

impl PvPtrs {
    /// The same product for the heads from `g` on.
    ///
    /// # Safety
    /// Head `g` is inside the caller's ranges.
    #[inline(always)]
    unsafe fn at_head(self, g: usize) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe {
            PvPtrs {
                p: self.p.add(g * self.ps),
                out: self.out.add(g * self.vd),
                ..self
            }
        }
    }
}

/// [`Pv`] on raw pointers: heads in register blocks of up to eight.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `p[g·ps + i]` is readable for `g < group`,
/// `i < n`; `v[i·vs + c]` is readable for `i < n`, `c < vd`; `out` has `group · vd` writable ones.
#[inline(always)]
unsafe fn pv_generic<S: Simd>(a: PvPtrs, group: usize) {
    let mut g = 0;
    // SAFETY: each block covers heads `g..g + G` below `group`.
    unsafe {
        while g + 8 <= group {
            pv_block::<S, 8>(a.at_head(g));
            g += 8;
        }
        while g + 4 <= group {
            pv_block::<S, 4>(a.at_head(g));
            g += 4;
        }
        while g < group {
            pv_block::<S, 1>(a.at_head(g));
            g += 1;
        }
    }
}

/// `G` heads of [`pv_generic`]: for each column chunk the `G` accumulators stay in registers while
/// every value row streams past (each row is reused `G` times).
///
/// # Safety
/// As [`pv_generic`] with `group = G`.
#[inline(always)]
unsafe fn pv_block<S: Simd, const G: usize>(a: PvPtrs) {
    let PvPtrs {
        p,
        ps,
        v,
        n,
        vd,
        vs,
        out,
    } = a;
    // SAFETY: `c + LANES <= vd`, `i < n` and `g < G` keep every access inside the caller's ranges.
    unsafe {
        let mut c = 0;
        while c + S::LANES <= vd {
            let mut acc = [S::zero(); G];
            for (g, a) in acc.iter_mut().enumerate() {
                *a = S::load(out.add(g * vd + c));
            }
            for i in 0..n {
                let row = S::load(v.add(i * vs + c));
                for (g, a) in acc.iter_mut().enumerate() {
                    *a = S::fma(S::splat(*p.add(g * ps + i)), row, *a);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                S::store(out.add(g * vd + c), *a);
            }
            c += S::LANES;
        }
        for cc in c..vd {
            for g in 0..G {
                let mut s = *out.add(g * vd + cc);
                for i in 0..n {
                    s += *p.add(g * ps + i) * *v.add(i * vs + cc);
                }
                *out.add(g * vd + cc) = s;
            }
        }
    }
}

/// `e^x` for eight lanes (Cephes' single-precision method: `x = n·ln2 + r`, a degree-6
/// polynomial for `e^r`, `2^n` from the exponent bits). Relative error about 2e-7; inputs below
/// -87.3 give about 1e-38 rather than 0, which a softmax cannot tell apart.
///
/// # Safety
/// AVX2 and FMA are enabled in the caller.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2/FMA intrinsics, enabled by the caller.
    unsafe {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.7),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n·ln2, with ln2 split in two so the subtraction stays exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n))
    }
}

/// `Σ e^(x - max)` over `xs`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_exp_avx2(xs: &[f32], max: f32) -> f32 {
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - max).exp()).sum();
    // SAFETY: every chunk holds exactly 8 values; AVX2 and FMA are enabled here.
    let sum = unsafe {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for c in chunks {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m)));
        }
        Avx2Ops::hsum(acc)
    };
    sum + tail
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_avx2(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut chunks = xs.chunks_exact_mut(8);
    // SAFETY: every chunk holds exactly 8 values; AVX2 and FMA are enabled here.
    let sum = unsafe {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for c in chunks.by_ref() {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        Avx2Ops::hsum(acc)
    };
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        tail += *v;
    }
    let inv = 1.0 / (sum + tail);
    xs.iter_mut().for_each(|v| *v *= inv);
}

/// Rows `rows` of a weight matrix whose row `r` is `w[r·stride .. r·stride + k]` (a column window
/// of a wider matrix when `stride > k`).
#[derive(Clone)]
pub(crate) struct Rows<'a, W> {
    pub w: &'a [W],
    pub stride: usize,
    pub rows: Range<usize>,
}

impl<'a, W> Rows<'a, W> {
    /// Rows `rows` of the matrix whose row `r` starts at `w[r · stride]`.
    pub(crate) fn new(w: &'a [W], stride: usize, rows: Range<usize>) -> Self {
        Rows { w, stride, rows }
    }

    /// Asserts what the kernels need and returns the number of tokens `t = x.len() / k`.
    ///
    /// The kernels compute `out[i·t + j] = Σ_c x[j·k + c] · w[(rows.start + i)·stride + c]` for
    /// every row `i` of `rows` and token `j < t`: the weight-row-major layout of
    /// [`super::linear`].
    fn check(&self, x: &[f32], k: usize, out: &[f32]) -> usize {
        assert!(k > 0 && x.len().is_multiple_of(k), "x is not [t, {k}]");
        let t = x.len() / k;
        assert!(
            k <= self.stride,
            "rows of {k} at a stride of {}",
            self.stride
        );
        assert!(self.rows.start <= self.rows.end, "reversed row range");
        let end = match self.rows.len() {
            0 => 0,
            _ => (self.rows.end - 1) * self.stride + k,
        };
        assert!(end <= self.w.len(), "rows beyond w");
        assert!(
            self.rows
                .len()
                .checked_mul(t)
                .is_some_and(|e| e <= out.len()),
            "out too short"
        );
        t
    }

    fn first_row(&self) -> *const W {
        // `wrapping_add`: with no rows the offset may point past the end; it is never read then.
        self.w.as_ptr().wrapping_add(self.rows.start * self.stride)
    }
}

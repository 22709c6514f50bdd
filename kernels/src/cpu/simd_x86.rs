//! x86-64 SIMD kernels for [`super::linear`]: AVX2+FMA+F16C and AVX-512F, chosen at run time.
//!
//! Weights are widened to f32 in registers as they are loaded (bf16: zero-extend and shift;
//! f16: `vcvtph2ps`; f32: as is), so nothing is written back to memory. A register block of `R`
//! weight rows × `T` token rows keeps `R·T` independent accumulators: each loaded weight vector
//! feeds `T` multiply-adds and each activation vector `R`.
//!
//! Up to [`SLICE_FROM_TOKENS`] tokens (decode) are bound by memory bandwidth: the task's rows are
//! cut into stripes and one row of each is read at a time, so every thread keeps several long
//! sequential streams in flight (one stream, or adjacent rows, measured 20–40% slower with short
//! rows), and each weight is widened in registers as it streams past.
//!
//! More tokens are bound by arithmetic. Then [`PACK_ROWS`] rows × [`K_SLICE`] columns of weights
//! are widened once into a contiguous f32 panel that every group of tokens reuses from L1, while
//! the next panel is prefetched. Reading the rows in place instead left the multiply-adds waiting
//! on loads (weight rows 2ⁿ bytes apart and the activations fell into the same few L1 sets) and
//! widened every weight once per group of tokens: packing measured ~1.5× faster single-threaded at
//! 64 tokens. Partial sums of the `k` slices accumulate in `out`.
//!
//! Both instruction sets run the same generic code ([`Simd`] supplies the vector type and its
//! handful of operations). The generic functions are `#[inline(always)]` and are only ever called
//! from the two `#[target_feature]` entry points, so each instantiation is compiled inside, and
//! for, its instruction set.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use half::{bf16, f16};

/// Rows read at once with a single token: one from each of this many stripes of the task's rows
/// (four FMA chains, four sequential memory streams).
const STRIPES: usize = 4;
/// Weight rows per register block for several tokens: `ROWS_MANY × TOKENS` = 12 accumulators,
/// plus 3 weight vectors and 1 activation vector, fill the 16 ymm registers (best of 2×4, 4×2,
/// 3×4, 2×6 measured; 2×6 and 3×4 were within noise after packing).
const ROWS_MANY: usize = 3;
/// Token rows per register block.
const TOKENS: usize = 4;
const _: () = assert!(
    TOKENS <= 6,
    "token_blocks handles remainders of up to 5 tokens"
);

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

    /// [`Rows::apply`] with AVX2.
    pub(crate) fn rows<W: Elem>(self, m: Rows<'_, W>, x: &[f32], k: usize, out: &mut [f32]) {
        let t = m.check(x, k, out);
        // SAFETY: `self` exists only after AVX2, FMA and F16C were detected, and `check` asserted
        // exactly the bounds `rows_avx2` requires.
        unsafe {
            rows_avx2(
                m.first_row(),
                m.stride,
                m.rows.len(),
                x.as_ptr(),
                t,
                k,
                out.as_mut_ptr(),
            )
        }
    }
}

impl Avx2 {
    /// `iters` rounds of [`FMA_CHAINS`] independent multiply-adds; returns the FLOPs done.
    pub(crate) fn fma_flops(self, iters: usize) -> f64 {
        // SAFETY: `self` proves AVX2 and FMA.
        let sink = unsafe { fma_loop_avx2(iters) };
        std::hint::black_box(sink);
        (iters * FMA_CHAINS * 8 * 2) as f64
    }
}

impl Avx512 {
    /// `iters` rounds of [`FMA_CHAINS`] independent multiply-adds; returns the FLOPs done.
    pub(crate) fn fma_flops(self, iters: usize) -> f64 {
        // SAFETY: `self` proves AVX-512F.
        let sink = unsafe { fma_loop_avx512(iters) };
        std::hint::black_box(sink);
        (iters * FMA_CHAINS * 16 * 2) as f64
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

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_loop_avx2(iters: usize) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe { fma_loop::<Avx2Ops>(iters) }
}

/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn fma_loop_avx512(iters: usize) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe { fma_loop::<Avx512Ops>(iters) }
}

impl Avx512 {
    pub(crate) fn detect() -> Option<Self> {
        (Avx2::detect().is_some() && is_x86_feature_detected!("avx512f"))
            .then_some(Avx512 { _detected: () })
    }

    /// [`Rows::apply`] with AVX-512.
    pub(crate) fn rows<W: Elem>(self, m: Rows<'_, W>, x: &[f32], k: usize, out: &mut [f32]) {
        let t = m.check(x, k, out);
        // SAFETY: `self` exists only after AVX-512F (and AVX2, FMA, F16C) were detected, and
        // `check` asserted exactly the bounds `rows_avx512` requires.
        unsafe {
            rows_avx512(
                m.first_row(),
                m.stride,
                m.rows.len(),
                x.as_ptr(),
                t,
                k,
                out.as_mut_ptr(),
            )
        }
    }
}

/// `out[g·vd + c] += Σ_{i<n} p[g·ps + i] · v[i·vd + c]` for `g < group`, `c < vd`, with
/// `n = v.len() / vd`: attention's probability-weighted sum of value rows, for a group of heads.
pub(crate) struct Pv<'a> {
    pub p: &'a [f32],
    pub ps: usize,
    pub group: usize,
    pub v: &'a [f32],
    pub vd: usize,
}

impl Pv<'_> {
    /// Asserts the bounds [`pv_generic`] needs; returns `n`.
    fn check(&self, out: &[f32]) -> usize {
        assert!(
            self.vd > 0 && self.v.len().is_multiple_of(self.vd),
            "v is not [n, {}]",
            self.vd
        );
        let n = self.v.len() / self.vd;
        if n > 0 && self.group > 0 {
            assert!(
                (self.group - 1) * self.ps + n <= self.p.len(),
                "p too short"
            );
        }
        assert!(self.group * self.vd <= out.len(), "out too short");
        n
    }
}

impl Avx2 {
    /// [`Pv`] with AVX2.
    pub(crate) fn pv(self, a: Pv<'_>, out: &mut [f32]) {
        let n = a.check(out);
        // SAFETY: `self` proves AVX2 and FMA; `check` asserted the bounds `pv_avx2` needs.
        unsafe {
            pv_avx2(
                a.p.as_ptr(),
                a.ps,
                a.group,
                a.v.as_ptr(),
                n,
                a.vd,
                out.as_mut_ptr(),
            )
        }
    }

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
    /// [`Pv`] with AVX-512.
    pub(crate) fn pv(self, a: Pv<'_>, out: &mut [f32]) {
        let n = a.check(out);
        // SAFETY: `self` proves AVX-512F; `check` asserted the bounds `pv_avx512` needs.
        unsafe {
            pv_avx512(
                a.p.as_ptr(),
                a.ps,
                a.group,
                a.v.as_ptr(),
                n,
                a.vd,
                out.as_mut_ptr(),
            )
        }
    }

    /// `xs ← softmax(xs)` (the AVX2 code: a CPU with AVX-512F has AVX2 too).
    pub(crate) fn softmax(self, xs: &mut [f32]) {
        Avx2 { _detected: () }.softmax(xs)
    }

    /// `Σ e^(x - max)` (the AVX2 code).
    pub(crate) fn sum_exp(self, xs: &[f32], max: f32) -> f32 {
        Avx2 { _detected: () }.sum_exp(xs, max)
    }
}

/// # Safety
/// The CPU has AVX2 and FMA; otherwise as [`pv_generic`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_avx2(
    p: *const f32,
    ps: usize,
    group: usize,
    v: *const f32,
    n: usize,
    vd: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe { pv_generic::<Avx2Ops>(p, ps, group, v, n, vd, out) }
}

/// # Safety
/// The CPU has AVX-512F; otherwise as [`pv_generic`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn pv_avx512(
    p: *const f32,
    ps: usize,
    group: usize,
    v: *const f32,
    n: usize,
    vd: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe { pv_generic::<Avx512Ops>(p, ps, group, v, n, vd, out) }
}

/// [`Pv`] on raw pointers: heads in register blocks of up to eight.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `p[g·ps + i]` is readable for `g < group`,
/// `i < n`; `v` has `n · vd` readable values; `out` has `group · vd` writable ones.
#[inline(always)]
unsafe fn pv_generic<S: Simd>(
    p: *const f32,
    ps: usize,
    group: usize,
    v: *const f32,
    n: usize,
    vd: usize,
    out: *mut f32,
) {
    let mut g = 0;
    // SAFETY: each block covers heads `g..g + G` below `group`.
    unsafe {
        while g + 8 <= group {
            pv_block::<S, 8>(p.add(g * ps), ps, v, n, vd, out.add(g * vd));
            g += 8;
        }
        while g + 4 <= group {
            pv_block::<S, 4>(p.add(g * ps), ps, v, n, vd, out.add(g * vd));
            g += 4;
        }
        while g < group {
            pv_block::<S, 1>(p.add(g * ps), ps, v, n, vd, out.add(g * vd));
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
unsafe fn pv_block<S: Simd, const G: usize>(
    p: *const f32,
    ps: usize,
    v: *const f32,
    n: usize,
    vd: usize,
    out: *mut f32,
) {
    // SAFETY: `c + LANES <= vd`, `i < n` and `g < G` keep every access inside the caller's ranges.
    unsafe {
        let mut c = 0;
        while c + S::LANES <= vd {
            let mut acc = [S::zero(); G];
            for (g, a) in acc.iter_mut().enumerate() {
                *a = S::load(out.add(g * vd + c));
            }
            for i in 0..n {
                let row = S::load(v.add(i * vd + c));
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
                    s += *p.add(g * ps + i) * *v.add(i * vd + cc);
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

impl<W> Rows<'_, W> {
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

/// A weight element type the kernels can widen to f32 in registers.
pub(crate) trait Elem: Copy {
    /// Eight consecutive elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// Called only from code compiled with AVX2, FMA and F16C enabled; `p..p + 8` is readable.
    unsafe fn load8(p: *const Self) -> __m256;

    /// Sixteen consecutive elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// Called only from code compiled with AVX-512F enabled; `p..p + 16` is readable.
    unsafe fn load16(p: *const Self) -> __m512;

    fn widen(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 at `p` and AVX; `loadu` needs no alignment.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at `p` and AVX-512F.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline]
    fn widen(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p` and AVX2; `loadu` needs
        // no alignment. bf16 is the top half of an f32: zero-extend each to 32 bits and shift.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) at `p` and AVX-512F.
        unsafe {
            let h = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Elem for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 (16 bytes) at `p` and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f16 (32 bytes) at `p` and AVX-512F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// The vector operations the generic kernels use, for one instruction set.
///
/// # Safety
/// Implementations call intrinsics of their instruction set: every method may only run in code
/// compiled with that set enabled (the `#[target_feature]` entry points below).
trait Simd {
    type V: Copy;
    /// f32 lanes per vector.
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    /// `LANES` readable f32 at `p`.
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` readable weights at `p`, widened.
    unsafe fn load_w<W: Elem>(p: *const W) -> Self::V;
    /// `a · b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    unsafe fn splat(v: f32) -> Self::V;
    /// `LANES` writable f32 at `p`.
    unsafe fn store(p: *mut f32, v: Self::V);
}

struct Avx2Ops;
struct Avx512Ops;

impl Simd for Avx2Ops {
    type V = __m256;
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: AVX is enabled in every caller (see the trait).
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 at `p`.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load_w<W: Elem>(p: *const W) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements; AVX2 + F16C are enabled.
        unsafe { W::load8(p) }
    }

    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: FMA is enabled in every caller.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX (and SSE3) are enabled in every caller.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> __m256 {
        // SAFETY: AVX is enabled in every caller.
        unsafe { _mm256_set1_ps(v) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: the caller guarantees 8 writable f32 at `p`.
        unsafe { _mm256_storeu_ps(p, v) }
    }
}

impl Simd for Avx512Ops {
    type V = __m512;
    const LANES: usize = 16;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512F is enabled in every caller.
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load_w<W: Elem>(p: *const W) -> __m512 {
        // SAFETY: the caller guarantees 16 readable elements; AVX-512F is enabled.
        unsafe { W::load16(p) }
    }

    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: AVX-512F is enabled in every caller.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        // SAFETY: AVX-512F is enabled in every caller.
        unsafe { _mm512_reduce_add_ps(v) }
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        // SAFETY: AVX-512F is enabled in every caller.
        unsafe { _mm512_set1_ps(v) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the caller guarantees 16 writable f32 at `p`.
        unsafe { _mm512_storeu_ps(p, v) }
    }
}

/// [`rows_generic`] compiled for AVX2 + FMA + F16C.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; otherwise as [`rows_generic`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<W: Elem>(
    w: *const W,
    ws: usize,
    nr: usize,
    x: *const f32,
    t: usize,
    k: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe { rows_generic::<Avx2Ops, W>(w, ws, nr, x, t, k, out) }
}

/// [`rows_generic`] compiled for AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; otherwise as [`rows_generic`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512<W: Elem>(
    w: *const W,
    ws: usize,
    nr: usize,
    x: *const f32,
    t: usize,
    k: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe { rows_generic::<Avx512Ops, W>(w, ws, nr, x, t, k, out) }
}

/// One matrix product in flight: `nr` weight rows at `w` (row stride `ws`) against token rows at
/// `x` (row stride `xs`), over `len` columns; the result for weight row `i`, token `j` lives at
/// `out[i · os + j]`.
#[derive(Clone, Copy)]
struct Panel<W> {
    w: *const W,
    ws: usize,
    x: *const f32,
    xs: usize,
    len: usize,
    out: *mut f32,
    os: usize,
}

impl<W> Panel<W> {
    /// The same panel moved by `rows` weight rows and `tokens` token rows.
    ///
    /// # Safety
    /// The moved pointers stay inside (or one past) the caller's buffers.
    #[inline(always)]
    unsafe fn at(self, rows: usize, tokens: usize) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe {
            Panel {
                w: self.w.add(rows * self.ws),
                x: self.x.add(tokens * self.xs),
                out: self.out.add(rows * self.os + tokens),
                ..self
            }
        }
    }
}

/// Columns per slice of `k` when many tokens share the weights. Each slice of [`PACK_ROWS`] weight
/// rows is widened once into a contiguous f32 panel (12 KiB) that every group of tokens then reuses
/// from L1. Reading the rows in place instead made the weights (rows 2^n bytes apart) and the
/// activations compete for the same few L1 sets, and re-widened them for every token group.
const K_SLICE: usize = 256;
/// Weight rows per packed panel.
const PACK_ROWS: usize = 12;
/// Tokens from which products are cut into `K_SLICE` columns. Below it they are bound by memory:
/// whole rows stream once, which the prefetchers follow best.
const SLICE_FROM_TOKENS: usize = 8;

/// Writes `w_i · x_j` to `out[i · t + j]` for the `nr` weight rows at `w` (row stride `ws`, `k`
/// elements each) and the `t` token rows at `x` (stride `k`).
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `w[i·ws .. i·ws + k]` is readable for
/// every `i < nr`, `x` has `t · k` readable elements, and `out` has `nr · t` writable ones.
#[inline(always)]
unsafe fn rows_generic<S: Simd, W: Elem>(
    w: *const W,
    ws: usize,
    nr: usize,
    x: *const f32,
    t: usize,
    k: usize,
    out: *mut f32,
) {
    let whole = Panel {
        w,
        ws,
        x,
        xs: k,
        len: k,
        out,
        os: t,
    };
    // SAFETY: the token groups cover exactly the caller's `t` tokens, the slices its `k` columns
    // and `striped` its `nr` rows, so every access is inside the ranges the caller guarantees.
    unsafe {
        if t == 1 {
            striped::<S, W, STRIPES, false>(whole, nr, 1);
        } else if t < SLICE_FROM_TOKENS {
            striped::<S, W, ROWS_MANY, false>(whole, nr, t);
        } else {
            for i in 0..nr * t {
                *out.add(i) = 0.0;
            }
            let slices = k.div_ceil(K_SLICE);
            let width = k.div_ceil(slices).next_multiple_of(S::LANES);
            let mut packed = [0f32; PACK_ROWS * K_SLICE];
            for r0 in (0..nr).step_by(PACK_ROWS) {
                let rows = PACK_ROWS.min(nr - r0);
                let mut c = 0;
                while c < k {
                    let len = width.min(k - c);
                    for r in 0..rows {
                        pack_row::<S, W>(
                            w.add((r0 + r) * ws + c),
                            packed.as_mut_ptr().add(r * len),
                            len,
                        );
                    }
                    // The next panel's weights come from DRAM: ask for them now, so they arrive
                    // while this panel is multiplied (otherwise packing stalls on every line).
                    let (nr0, nc) = if c + len < k {
                        (r0, c + len)
                    } else {
                        (r0 + PACK_ROWS, 0)
                    };
                    for r in nr0..(nr0 + PACK_ROWS).min(nr) {
                        prefetch(w.add(r * ws + nc), width.min(k - nc) * size_of::<W>());
                    }
                    for j in (0..t).step_by(TOKENS) {
                        let p = Panel {
                            w: packed.as_ptr(),
                            ws: len,
                            x: x.add(j * k + c),
                            xs: k,
                            len,
                            out: out.add(r0 * t + j),
                            os: t,
                        };
                        striped::<S, f32, ROWS_MANY, true>(p, rows, TOKENS.min(t - j));
                    }
                    c += len;
                }
            }
        }
    }
}

/// Hints the CPU to start loading the `bytes` at `p` into cache (never faults, changes nothing).
#[inline(always)]
fn prefetch<T>(p: *const T, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is only a hint: it cannot fault, even on an invalid address, and
        // reads nothing the program can observe. SSE is part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(line)) };
    }
}

/// Widens `len` weights at `src` into f32 at `dst`.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `src` has `len` readable elements and
/// `dst` `len` writable ones.
#[inline(always)]
unsafe fn pack_row<S: Simd, W: Elem>(src: *const W, dst: *mut f32, len: usize) {
    // SAFETY: `c + LANES <= len` and `cc < len` keep every access inside both rows.
    unsafe {
        let mut c = 0;
        while c + S::LANES <= len {
            S::store(dst.add(c), S::load_w(src.add(c)));
            c += S::LANES;
        }
        for cc in c..len {
            *dst.add(cc) = (*src.add(cc)).widen();
        }
    }
}

/// The `nr` rows of `p` against `nt` tokens, `R` rows at a time taken from `R` stripes (block `i`
/// reads rows `i, i + q, …, i + (R-1)·q` with `q = nr / R`), so each thread keeps `R` sequential
/// memory streams in flight; the last `nr mod R` rows go one at a time. `ACC` adds to `out`
/// instead of storing.
///
/// # Safety
/// As [`block`], for `nr` rows and `nt` tokens.
#[inline(always)]
unsafe fn striped<S: Simd, W: Elem, const R: usize, const ACC: bool>(
    p: Panel<W>,
    nr: usize,
    nt: usize,
) {
    let q = nr / R;
    // SAFETY: block `i < q` touches rows `i + r·q < R·q <= nr` (r < R), and the single rows
    // `R·q..nr` are below `nr`.
    unsafe {
        for i in 0..q {
            let stripe = Panel {
                ws: q * p.ws,
                os: q * p.os,
                ..p.at(i, 0)
            };
            token_blocks::<S, W, R, ACC>(stripe, nt);
        }
        for i in R * q..nr {
            token_blocks::<S, W, 1, ACC>(p.at(i, 0), nt);
        }
    }
}

/// `R` weight rows of `p` against `nt` token rows, [`TOKENS`] at a time.
///
/// # Safety
/// As [`block`] with `T = nt`.
#[inline(always)]
unsafe fn token_blocks<S: Simd, W: Elem, const R: usize, const ACC: bool>(p: Panel<W>, nt: usize) {
    let mut j = 0;
    // SAFETY (every call): tokens `j..j + T` are below `nt`, so their rows of `x` and outputs are
    // inside the caller's ranges.
    unsafe {
        while j + TOKENS <= nt {
            block::<S, W, R, TOKENS, ACC>(p.at(0, j));
            j += TOKENS;
        }
        match nt - j {
            1 => block::<S, W, R, 1, ACC>(p.at(0, j)),
            2 => block::<S, W, R, 2, ACC>(p.at(0, j)),
            3 => block::<S, W, R, 3, ACC>(p.at(0, j)),
            4 => block::<S, W, R, 4, ACC>(p.at(0, j)),
            5 => block::<S, W, R, 5, ACC>(p.at(0, j)),
            _ => {}
        }
    }
}

/// `out[r · os + j] (+)= Σ_{c < len} w[r · ws + c] · x[j · xs + c]` for `r < R`, `j < T`
/// (`+=` when `ACC`).
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `w[r · ws..r · ws + len]` is readable
/// for every `r < R`, `x[j · xs..j · xs + len]` for every `j < T`, and `out[r · os + j]` is
/// writable for every `r < R`, `j < T`.
#[inline(always)]
unsafe fn block<S: Simd, W: Elem, const R: usize, const T: usize, const ACC: bool>(p: Panel<W>) {
    let Panel {
        w,
        ws,
        x,
        xs,
        len,
        out,
        os,
    } = p;
    // SAFETY: every intrinsic runs inside the caller's `#[target_feature]` context; the pointer
    // arithmetic stays inside the ranges the caller guarantees, as noted per access.
    unsafe {
        // acc[j][r]: token `j` times weight row `r`.
        let mut acc = [[S::zero(); R]; T];
        let mut c = 0;
        while c + S::LANES <= len {
            let mut wv = [S::zero(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                // `r < R` and `c + LANES <= len`: the lanes lie in row `r` of `w`.
                *v = S::load_w(w.add(r * ws + c));
            }
            for (j, acc_j) in acc.iter_mut().enumerate() {
                // `j < T` and `c + LANES <= len`: the lanes lie in row `j` of `x`.
                let xv = S::load(x.add(j * xs + c));
                for (a, wr) in acc_j.iter_mut().zip(&wv) {
                    *a = S::fma(*wr, xv, *a);
                }
            }
            c += S::LANES;
        }
        for (j, acc_j) in acc.iter().enumerate() {
            for (r, a) in acc_j.iter().enumerate() {
                let mut s = S::hsum(*a);
                for cc in c..len {
                    // `cc < len`, `r < R`, `j < T`: inside row `r` of `w` and row `j` of `x`.
                    s += (*w.add(r * ws + cc)).widen() * *x.add(j * xs + cc);
                }
                // The caller makes `out[r · os + j]` writable for `r < R`, `j < T`.
                let o = out.add(r * os + j);
                *o = if ACC { *o + s } else { s };
            }
        }
    }
}

//! Vector types for the x86 kernels: [`Elem`] widens a weight dtype to f32 lanes, [`Simd`]
//! is the handful of vector operations the generic kernels use, implemented once for AVX2
//! ([`Avx2Ops`], 8 lanes) and once for AVX-512F ([`Avx512Ops`], 16 lanes).

use std::arch::x86_64::*;

use half::{bf16, f16};

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
pub(super) trait Simd {
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
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    unsafe fn splat(v: f32) -> Self::V;
    /// `LANES` writable f32 at `p`.
    unsafe fn store(p: *mut f32, v: Self::V);
}

pub(super) struct Avx2Ops;
pub(super) struct Avx512Ops;

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
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: register-only AVX intrinsic, enabled by the caller.
        unsafe { _mm256_add_ps(a, b) }
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
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F intrinsic, enabled by the caller.
        unsafe { _mm512_add_ps(a, b) }
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

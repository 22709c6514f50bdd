//! AVX2 + FMA (+ F16C) kernels for [`super::linear`], chosen at run time.
//!
//! Weights are widened to f32 in registers as they are loaded (bf16: zero-extend and shift;
//! f16: `vcvtph2ps`; f32: as is), so nothing is written back to memory. A register block of `R`
//! weight rows × `T` token rows keeps `R·T` independent accumulators: each loaded weight vector
//! feeds `T` multiply-adds and each activation vector `R`.
//!
//! One token (decode) is bound by memory bandwidth: the task's rows are cut into four stripes and
//! one row of each is read at a time, so every thread keeps four long sequential streams in
//! flight (one stream, or four adjacent rows, measured 20–40% slower with short rows). Several
//! tokens are cut into tiles of up to [`MAX_TILE_TOKENS`] whose activations ([`X_TILE_BYTES`]) stay
//! in L2 while every row block of the rayon task passes over them; the task's weight rows (at most
//! ~1 MiB of bf16, see `rows_per_task`) stay in L2/L3 between tiles, so each weight byte still
//! comes from DRAM once per call. (Slicing `k` as well, to keep the tile in L1, measured slower
//! here: the per-slice reductions cost more than L2 reads.)

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use half::{bf16, f16};

/// Rows read at once with a single token: one from each of this many stripes of the task's rows
/// (four FMA chains, four sequential memory streams).
const STRIPES: usize = 4;
/// Weight rows per register block for several tokens: `ROWS_MANY × TOKENS` = 12 accumulators,
/// plus 3 weight vectors and 1 activation vector, fill the 16 ymm registers (best of 2×4, 4×2,
/// 3×4, 2×6 measured).
const ROWS_MANY: usize = 3;
/// Token rows per register block.
const TOKENS: usize = 4;
/// Bytes of activations in one token tile (`tokens × k × 4`): half of a 512 KiB L2.
const X_TILE_BYTES: usize = 256 << 10;
/// Most tokens in one tile.
const MAX_TILE_TOKENS: usize = 32;

/// Proof that this CPU has AVX2, FMA and F16C: only [`Avx2::detect`] makes one, so holding one is
/// what makes calling the `#[target_feature]` kernels below sound.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2 {
    _detected: (),
}

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2 { _detected: () })
    }

    /// `out[i·t + j] = Σ_c x[j, c] · w[rows.start + i, c]` for every row `i` of `rows` and token
    /// `j < t = x.len() / k`: the weight-row-major layout of [`super::linear`].
    pub(crate) fn rows<W: Elem>(
        self,
        w: &[W],
        rows: Range<usize>,
        x: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        assert!(k > 0 && x.len().is_multiple_of(k), "x is not [t, {k}]");
        let t = x.len() / k;
        assert!(
            rows.start <= rows.end && rows.end.checked_mul(k).is_some_and(|e| e <= w.len()),
            "rows beyond w"
        );
        assert!(
            rows.len().checked_mul(t).is_some_and(|e| e <= out.len()),
            "out too short"
        );
        // SAFETY: `self` exists only after AVX2, FMA and F16C were detected, and the asserts above
        // are exactly the bounds `rows_avx2` requires: rows `rows` of `w` are in bounds, `x` holds
        // `t` rows of `k` and `out` holds `rows.len() · t` values.
        unsafe {
            rows_avx2(
                w.as_ptr().add(rows.start * k),
                rows.len(),
                x.as_ptr(),
                t,
                k,
                out.as_mut_ptr(),
            )
        }
    }
}

/// A weight element type the kernels can widen to f32 in registers.
pub(crate) trait Elem: Copy {
    /// Eight consecutive elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `p..p + 8` is readable.
    unsafe fn load8(p: *const Self) -> __m256;

    fn widen(self) -> f32;
}

impl Elem for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 at `p`; `loadu` needs no alignment.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline]
    fn widen(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p`; `loadu` needs no
        // alignment. bf16 is the top half of an f32: zero-extend each to 32 bits and shift.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Elem for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16 (16 bytes) at `p`; `loadu` needs no
        // alignment.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(h)
    }

    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The whole of [`Avx2::rows`]: writes `w_i · x_j` to `out[i · t + j]` for the `nr` weight rows
/// at `w` and the `t` token rows at `x` (both of stride `k`).
///
/// # Safety
/// AVX2, FMA and F16C are available; `w` has `nr · k` readable elements, `x` has `t · k`, and
/// `out` has `nr · t` writable ones.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<W: Elem>(
    w: *const W,
    nr: usize,
    x: *const f32,
    t: usize,
    k: usize,
    out: *mut f32,
) {
    // SAFETY: with one token, block `i < q` reads rows (and writes outputs) `i + s·q` for
    // `s < STRIPES`, all below `STRIPES·q <= nr`, and the rows `STRIPES·q..nr` are read one at a
    // time; otherwise the tiles cover exactly the caller's `nr` rows and `t` tokens.
    unsafe {
        if t == 1 {
            // Stripe `s` holds rows `s·q..(s + 1)·q`; a block takes one row from each, so it
            // reads `STRIPES` long sequential streams.
            let q = nr / STRIPES;
            for i in 0..q {
                block::<W, STRIPES, 1>(w.add(i * k), q * k, x, k, out.add(i), q);
            }
            for i in STRIPES * q..nr {
                block::<W, 1, 1>(w.add(i * k), k, x, k, out.add(i), 1);
            }
        } else {
            let tile = (X_TILE_BYTES / (4 * k) / TOKENS * TOKENS).clamp(TOKENS, MAX_TILE_TOKENS);
            tiles::<W, ROWS_MANY>(w, nr, x, t, k, tile, out);
        }
    }
}

/// [`rows_avx2`] in tiles of `tile` tokens, `R` weight rows at a time.
///
/// # Safety
/// As [`rows_avx2`]; `tile` is at least 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiles<W: Elem, const R: usize>(
    w: *const W,
    nr: usize,
    x: *const f32,
    t: usize,
    k: usize,
    tile: usize,
    out: *mut f32,
) {
    for j in (0..t).step_by(tile) {
        let nt = tile.min(t - j);
        let mut i = 0;
        // SAFETY (both loops): rows `i..i + R` (or `i`) are below `nr` and tokens `j..j + nt`
        // below `t`, so every weight, activation and output touched is inside the caller's ranges.
        unsafe {
            while i + R <= nr {
                token_blocks::<W, R>(w.add(i * k), x.add(j * k), nt, k, out.add(i * t + j), t);
                i += R;
            }
            while i < nr {
                token_blocks::<W, 1>(w.add(i * k), x.add(j * k), nt, k, out.add(i * t + j), t);
                i += 1;
            }
        }
    }
}

/// `R` weight rows against `nt` token rows, [`TOKENS`] at a time.
///
/// # Safety
/// As [`block`] with `T = nt`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn token_blocks<W: Elem, const R: usize>(
    w: *const W,
    x: *const f32,
    nt: usize,
    k: usize,
    out: *mut f32,
    stride: usize,
) {
    let mut j = 0;
    // SAFETY (every call): tokens `j..j + T` are below `nt`, so their rows of `x` and the outputs
    // `r · stride + j..r · stride + j + T` (r < R) are inside the caller's ranges.
    unsafe {
        while j + TOKENS <= nt {
            block::<W, R, TOKENS>(w, k, x.add(j * k), k, out.add(j), stride);
            j += TOKENS;
        }
        match nt - j {
            1 => block::<W, R, 1>(w, k, x.add(j * k), k, out.add(j), stride),
            2 => block::<W, R, 2>(w, k, x.add(j * k), k, out.add(j), stride),
            3 => block::<W, R, 3>(w, k, x.add(j * k), k, out.add(j), stride),
            _ => {}
        }
    }
}

/// `out[r · stride + j] = Σ_{c < k} w[r · ws + c] · x[j · k + c]` for `r < R`, `j < T`.
///
/// # Safety
/// AVX2, FMA and F16C are available; `w[r · ws..r · ws + k]` is readable for every `r < R`,
/// `x` has `T · k` readable elements, and `out[r · stride + j]` is writable for every `r < R`,
/// `j < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block<W: Elem, const R: usize, const T: usize>(
    w: *const W,
    ws: usize,
    x: *const f32,
    k: usize,
    out: *mut f32,
    stride: usize,
) {
    // acc[j][r]: token `j` times weight row `r`.
    let mut acc = [[_mm256_setzero_ps(); R]; T];
    let mut c = 0;
    while c + 8 <= k {
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            // SAFETY: `r < R` and `c + 8 <= k`, so the 8 elements lie in row `r` of `w`.
            *v = unsafe { W::load8(w.add(r * ws + c)) };
        }
        for (j, acc_j) in acc.iter_mut().enumerate() {
            // SAFETY: `j < T` and `c + 8 <= k`, so the 8 values lie in row `j` of `x`.
            let xv = unsafe { _mm256_loadu_ps(x.add(j * k + c)) };
            for (a, wr) in acc_j.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(*wr, xv, *a);
            }
        }
        c += 8;
    }
    for (j, acc_j) in acc.iter().enumerate() {
        for (r, a) in acc_j.iter().enumerate() {
            let mut s = hsum(*a);
            for cc in c..k {
                // SAFETY: `cc < k`, `r < R`, `j < T`: inside row `r` of `w` and row `j` of `x`.
                s += unsafe { (*w.add(r * ws + cc)).widen() * *x.add(j * k + cc) };
            }
            // SAFETY: the caller makes `out[r · stride + j]` writable for `r < R`, `j < T`.
            unsafe { *out.add(r * stride + j) = s };
        }
    }
}

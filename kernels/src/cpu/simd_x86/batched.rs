//! The compute-bound product (many tokens share each weight): tokens in vector lanes.
//!
//! The activations come transposed, feature-major (`xt[c · tp + j]`, `tp` = tokens rounded up to
//! whole vectors, zero-padded), so one vector holds one feature of `LANES` tokens. Each weight is
//! then a scalar broadcast against two such vectors, and a register block of [`ROWS`] weight
//! rows × 2 token vectors keeps 12 accumulators that are the outputs themselves (weight-row-major,
//! what `out` wants): no horizontal sums, unlike dot products along `k`, which must reduce their
//! accumulators after every slice of `k` (measured 10–25% slower at 16 tokens, BENCHMARKS.md).
//!
//! Weights are widened once per [`ROWS`] × [`K_SLICE`] panel into a small f32 buffer that every
//! token block reuses from L1 (a broadcast from memory is a plain load there), while the next
//! panel is prefetched from DRAM.

use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};

use super::vector::{Elem, Simd};

/// Weight rows per register block: 6 rows × 2 token vectors = 12 accumulators, plus 2 activation
/// vectors and 1 broadcast weight, fit the 16 ymm registers.
const ROWS: usize = 6;
/// Columns of `k` per widened panel: 6 × 256 f32 = 6 KiB, beside 256 × 16 tokens × 4 B = 16 KiB
/// of activations, inside a 32 KiB L1.
const K_SLICE: usize = 256;

/// `out[i · t + j] = Σ_c w[i · ws + c] · xt[c · tp + j]` for `i < nr`, `j < t`.
#[derive(Clone, Copy)]
pub(super) struct Batched<W> {
    pub(super) w: *const W,
    pub(super) ws: usize,
    pub(super) nr: usize,
    pub(super) k: usize,
    pub(super) xt: *const f32,
    pub(super) tp: usize,
    pub(super) t: usize,
    pub(super) out: *mut f32,
}

/// Runs `b`.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `w[i·ws .. i·ws + k]` is readable for
/// every `i < nr`; `xt` has `k · tp` readable elements with `t <= tp` and `tp` a multiple of
/// `S::LANES`; `out` has `nr · t` writable ones.
#[inline(always)]
pub(super) unsafe fn batched<S: Simd, W: Elem>(b: Batched<W>) {
    let Batched {
        w,
        ws,
        nr,
        k,
        xt,
        tp,
        t,
        out,
    } = b;
    // SAFETY: every pointer below stays inside the ranges the caller guarantees, as noted.
    unsafe {
        for i in 0..nr * t {
            *out.add(i) = 0.0;
        }
        let mut panel = [0f32; ROWS * K_SLICE];
        for r0 in (0..nr).step_by(ROWS) {
            let rows = ROWS.min(nr - r0);
            for c0 in (0..k).step_by(K_SLICE) {
                let len = K_SLICE.min(k - c0);
                for r in 0..rows {
                    // Row `r0 + r < nr`, columns `c0..c0 + len` within `k`.
                    widen_row::<S, W>(
                        w.add((r0 + r) * ws + c0),
                        panel.as_mut_ptr().add(r * len),
                        len,
                    );
                }
                // The next panel's weights come from DRAM: ask for them now, so they arrive while
                // this one is multiplied.
                let (nr0, nc) = if c0 + len < k {
                    (r0, c0 + len)
                } else {
                    (r0 + ROWS, 0)
                };
                for r in nr0..(nr0 + ROWS).min(nr) {
                    prefetch(w.add(r * ws + nc), K_SLICE.min(k - nc) * size_of::<W>());
                }
                let mut j = 0;
                while j < t {
                    // `xt` rows `c0..c0 + len`, token lanes `j..j + 2·LANES` (or one vector at the
                    // end), inside `tp` because `tp` is a whole number of vectors.
                    let tile = Tile {
                        panel: panel.as_ptr(),
                        len,
                        xt: xt.add(c0 * tp + j),
                        tp,
                        out: out.add(r0 * t + j),
                        os: t,
                        live: t - j,
                    };
                    let two = j + S::LANES < t;
                    match (rows, two) {
                        (ROWS, true) => tile_block::<S, ROWS, 2>(tile),
                        (ROWS, false) => tile_block::<S, ROWS, 1>(tile),
                        (_, true) => tile_rows::<S, 2>(tile, rows),
                        (_, false) => tile_rows::<S, 1>(tile, rows),
                    }
                    j += if two { 2 * S::LANES } else { S::LANES };
                }
            }
        }
    }
}

/// One register block's inputs: `panel` rows (stride `len`) against `xt` (row stride `tp`); the
/// result for row `r`, token lane `l` goes to `out[r · os + l]` for `l < live`.
#[derive(Clone, Copy)]
struct Tile {
    panel: *const f32,
    len: usize,
    xt: *const f32,
    tp: usize,
    out: *mut f32,
    os: usize,
    live: usize,
}

/// The last `rows < ROWS` rows of a panel, one at a time.
///
/// # Safety
/// As [`tile_block`], for `rows` rows.
#[inline(always)]
unsafe fn tile_rows<S: Simd, const V: usize>(tile: Tile, rows: usize) {
    for r in 0..rows {
        // SAFETY: row `r < rows` of the panel and of `out`.
        unsafe {
            tile_block::<S, 1, V>(Tile {
                panel: tile.panel.add(r * tile.len),
                out: tile.out.add(r * tile.os),
                ..tile
            })
        }
    }
}

/// `out[r · os + l] += Σ_{c < len} panel[r · len + c] · xt[c · tp + l]` for `r < R` and the `l <
/// live` of `V` token vectors.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `panel` has `R · len` readable values,
/// `xt[c · tp .. c · tp + V · LANES]` is readable for `c < len`, and `out[r · os + l]` is writable
/// for `r < R`, `l < min(live, V · LANES)`.
#[inline(always)]
unsafe fn tile_block<S: Simd, const R: usize, const V: usize>(tile: Tile) {
    let Tile {
        panel,
        len,
        xt,
        tp,
        out,
        os,
        live,
    } = tile;
    // SAFETY: `c < len`, `r < R` and `v < V` keep every load inside the ranges above; stores go
    // through `add_out`, which writes only the live lanes.
    unsafe {
        let mut acc = [[S::zero(); V]; R];
        for c in 0..len {
            let mut xv = [S::zero(); V];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = S::load(xt.add(c * tp + v * S::LANES));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wv = S::splat(*panel.add(r * len + c));
                for (a, x) in acc_r.iter_mut().zip(&xv) {
                    *a = S::fma(wv, *x, *a);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, a) in acc_r.iter().enumerate() {
                let first = v * S::LANES;
                if first < live {
                    add_out::<S>(out.add(r * os + first), *a, (live - first).min(S::LANES));
                }
            }
        }
    }
}

/// `p[l] += a[l]` for the first `n <= LANES` lanes.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `p` has `n` writable values.
#[inline(always)]
unsafe fn add_out<S: Simd>(p: *mut f32, a: S::V, n: usize) {
    // SAFETY: whole vectors only when `n == LANES`; otherwise lanes go one by one, `l < n`.
    unsafe {
        if n == S::LANES {
            S::store(p, S::add(S::load(p), a));
        } else {
            let mut lanes = [0f32; 16];
            S::store(lanes.as_mut_ptr(), a);
            for (l, v) in lanes.iter().take(n).enumerate() {
                *p.add(l) += v;
            }
        }
    }
}

/// Widens `len` weights at `src` into f32 at `dst`.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `src` has `len` readable elements and
/// `dst` `len` writable ones.
#[inline(always)]
unsafe fn widen_row<S: Simd, W: Elem>(src: *const W, dst: *mut f32, len: usize) {
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

/// Hints the CPU to start loading the `bytes` at `p` into cache (never faults, changes nothing).
#[inline(always)]
fn prefetch<T>(p: *const T, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is only a hint: it cannot fault, even on an invalid address, and
        // reads nothing the program can observe. SSE is part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(line)) };
    }
}

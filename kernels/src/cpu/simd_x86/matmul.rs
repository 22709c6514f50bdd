//! The decode matrix kernel behind [`super::Avx2::rows`] and [`super::Avx512::rows`], generic over
//! the instruction set ([`Simd`]) and the weight dtype ([`Elem`]).
//!
//! Decode's few tokens are bound by memory bandwidth: the task's rows are cut into stripes and
//! one row of each is read at a time, so every thread keeps several long sequential streams in
//! flight (one stream, or adjacent rows, measured 20–40% slower with short rows), and each weight
//! is widened in registers as it streams past. Many tokens go to [`super::batched`] instead.

use super::vector::{Elem, Simd};

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

/// One matrix product in flight: `nr` weight rows at `w` (row stride `ws`) against token rows at
/// `x` (row stride `xs`), over `len` columns; the result for weight row `i`, token `j` lives at
/// `out[i · os + j]`.
#[derive(Clone, Copy)]
pub(super) struct Panel<W> {
    pub(super) w: *const W,
    pub(super) ws: usize,
    pub(super) x: *const f32,
    pub(super) xs: usize,
    pub(super) len: usize,
    pub(super) out: *mut f32,
    pub(super) os: usize,
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

/// Writes `w_i · x_j` to `out[i · t + j]` for the `nr` weight rows of `whole` and its `t` token
/// rows (`whole` spans the full `k` columns, with `os = t`): the memory-bound path, for the few
/// tokens of decode.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `w[i·ws .. i·ws + k]` is readable for
/// every `i < nr`, `x` has `t · k` readable elements, and `out` has `nr · t` writable ones.
#[inline(always)]
pub(super) unsafe fn rows_generic<S: Simd, W: Elem>(whole: Panel<W>, nr: usize, t: usize) {
    // SAFETY: `striped` covers exactly the caller's `nr` rows and `t` tokens.
    unsafe {
        if t == 1 {
            striped::<S, W, STRIPES>(whole, nr, 1);
        } else {
            striped::<S, W, ROWS_MANY>(whole, nr, t);
        }
    }
}

/// The `nr` rows of `p` against `nt` tokens, `R` rows at a time taken from `R` stripes (block `i`
/// reads rows `i, i + q, …, i + (R-1)·q` with `q = nr / R`), so each thread keeps `R` sequential
/// memory streams in flight; the last `nr mod R` rows go one at a time.
///
/// # Safety
/// As [`block`], for `nr` rows and `nt` tokens.
#[inline(always)]
unsafe fn striped<S: Simd, W: Elem, const R: usize>(p: Panel<W>, nr: usize, nt: usize) {
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
            token_blocks::<S, W, R>(stripe, nt);
        }
        for i in R * q..nr {
            token_blocks::<S, W, 1>(p.at(i, 0), nt);
        }
    }
}

/// `R` weight rows of `p` against `nt` token rows, [`TOKENS`] at a time.
///
/// # Safety
/// As [`block`] with `T = nt`.
#[inline(always)]
unsafe fn token_blocks<S: Simd, W: Elem, const R: usize>(p: Panel<W>, nt: usize) {
    let mut j = 0;
    // SAFETY (every call): tokens `j..j + T` are below `nt`, so their rows of `x` and outputs are
    // inside the caller's ranges.
    unsafe {
        while j + TOKENS <= nt {
            block::<S, W, R, TOKENS>(p.at(0, j));
            j += TOKENS;
        }
        match nt - j {
            1 => block::<S, W, R, 1>(p.at(0, j)),
            2 => block::<S, W, R, 2>(p.at(0, j)),
            3 => block::<S, W, R, 3>(p.at(0, j)),
            4 => block::<S, W, R, 4>(p.at(0, j)),
            5 => block::<S, W, R, 5>(p.at(0, j)),
            _ => {}
        }
    }
}

/// `out[r · os + j] = Σ_{c < len} w[r · ws + c] · x[j · xs + c]` for `r < R`, `j < T`.
///
/// # Safety
/// Runs inside a `#[target_feature]` entry point for `S`; `w[r · ws..r · ws + len]` is readable
/// for every `r < R`, `x[j · xs..j · xs + len]` for every `j < T`, and `out[r · os + j]` is
/// writable for every `r < R`, `j < T`.
#[inline(always)]
unsafe fn block<S: Simd, W: Elem, const R: usize, const T: usize>(p: Panel<W>) {
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
                *o = s;
            }
        }
    }
}

//! Products with a separate weight block per attention head (MLA's absorbed up-projections).
//!
//! Each head's activations are a column window of `x`, so they are gathered into a contiguous
//! `[t, k]` matrix once per head; the product then runs on the same SIMD row kernel as every
//! linear layer, one head per task when the work is worth a parallel region.

use rayon::prelude::*;

use super::linear::{Acts, Isa, Mat, rows_times_x, worth_parallel};
use super::pool;
use crate::WeightView;

/// The shape of a per-head product: `heads` blocks of `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub heads: usize,
    pub k: usize,
    pub n: usize,
}

/// `y[t, h·n + j] = Σ_c x[t, h·k + c] · w[h·n + j, c]` for `x: [t, heads·k]`, `w: [heads·n, k]`.
pub(crate) fn head_linear(x: &[f32], w: WeightView<'_>, s: Heads) -> Vec<f32> {
    head_linear_with(Isa::best(), x, w, s)
}

/// [`head_linear`] on a chosen implementation.
pub(crate) fn head_linear_with(isa: Isa, x: &[f32], w: WeightView<'_>, s: Heads) -> Vec<f32> {
    let Heads { heads, k, n } = s;
    let width = heads * k;
    let t = x.len().checked_div(width).unwrap_or(0);
    let mut y = pool::zeroed(t * heads * n);
    if t == 0 || n == 0 {
        return y;
    }
    // Weight-row-major results per head: `out[h][j·t + i]` for token `i`, output `j`.
    let one = |h: usize, out: &mut [f32]| {
        let mut xh = pool::zeroed(t * k);
        for (dst, row) in xh.chunks_exact_mut(k.max(1)).zip(x.chunks_exact(width)) {
            dst.copy_from_slice(&row[h * k..][..k]);
        }
        let m = Mat {
            w,
            offset: h * n * k,
            stride: k,
        };
        rows_times_x(isa, m, 0..n, Acts::rows(&xh, k), out);
        pool::give(xh);
    };
    let mut outs = pool::zeroed(heads * n * t);
    if worth_parallel(heads * n * k * t) {
        outs.par_chunks_mut(n * t)
            .enumerate()
            .for_each(|(h, o)| one(h, o));
    } else {
        outs.chunks_mut(n * t)
            .enumerate()
            .for_each(|(h, o)| one(h, o));
    }
    for (h, out) in outs.chunks_exact(n * t).enumerate() {
        for (j, col) in out.chunks_exact(t).enumerate() {
            for (i, v) in col.iter().enumerate() {
                y[i * heads * n + h * n + j] = *v;
            }
        }
    }
    pool::give(outs);
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::linear::tests::isas;
    use half::bf16;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn every_head_uses_its_own_block_on_every_implementation() {
        // Token counts on both sides of the batched kernel's threshold.
        for (heads, k, n, t) in [(4, 8, 16, 1), (3, 20, 7, 9), (2, 64, 40, 3), (1, 5, 3, 12)] {
            let x = data(t * heads * k, 1);
            let w: Vec<bf16> = data(heads * n * k, 2)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut want = vec![0f64; t * heads * n];
            for i in 0..t {
                for h in 0..heads {
                    for j in 0..n {
                        want[i * heads * n + h * n + j] = (0..k)
                            .map(|c| {
                                x[i * heads * k + h * k + c] as f64
                                    * w[(h * n + j) * k + c].to_f64()
                            })
                            .sum();
                    }
                }
            }
            for isa in isas() {
                let got = head_linear_with(isa, &x, WeightView::BF16(&w), Heads { heads, k, n });
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-4,
                        "{isa:?} {heads}x[{n},{k}] t{t}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

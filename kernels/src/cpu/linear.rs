//! Matrix multiplication `x · Wᵀ` with f32 activations and weights in their stored dtype.
//!
//! Decode is bound by memory bandwidth, so the kernel streams every weight row exactly once per
//! call, whatever the number of tokens: each row is widened to f32 once (into a per-thread buffer,
//! no allocation per call) and then dotted with every token's activations. Rows are spread over the
//! rayon pool in chunks big enough to amortise scheduling.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::WeightView;

thread_local! {
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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

/// `y[t, n] = Σ_k x[t, k] · w[n, k] (+ bias[n])` for `x: [t, k]`, `w: [n, k]`.
pub(crate) fn linear(
    x: &[f32],
    k: usize,
    w: WeightView<'_>,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let t = x.len() / k;
    // Rows per task: enough multiply-adds (~32K) that rayon's overhead is noise.
    let rows_per_task = (32_768 / (k * t).max(1)).clamp(1, 256);
    let mut out_t = vec![0f32; n * t];
    out_t
        .par_chunks_mut(rows_per_task * t)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = c * rows_per_task;
            let end = (start + rows_per_task).min(n);
            rows_times_x(&w, start..end, x, k, chunk);
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
    use half::bf16;

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
}

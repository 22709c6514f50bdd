//! Elementwise and row-wise CPU kernels: RMSNorm, RoPE, SiLU×mul, column and head reshuffles.

use crate::{RopeApply, RopeLayout};

/// RMSNorm over each contiguous group of `w.len()` elements, computed in f32 like transformers.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let g = w.len();
    let mut out = super::pool::zeroed(x.len());
    for (o, xs) in out.chunks_exact_mut(g).zip(x.chunks_exact(g)) {
        // `dot` keeps eight partial sums: a plain `.sum()` is one serial chain of adds.
        let ms = super::linear::dot(xs, xs) / g as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), ww) in o.iter_mut().zip(xs).zip(w) {
            *o = ww * (v * inv);
        }
    }
    out
}

#[inline]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

pub(crate) fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(g, u)| silu(*g) * u).collect()
}

/// cos and sin of `position · inv_freq` for every token, `[tokens, rot_dim/2]` each, scaled.
pub(crate) fn rope_angles(
    positions: &[u32],
    inv_freq: &[f32],
    scaling: f32,
) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            // f32 product, as transformers computes it, so large positions round the same way.
            let a = p as f32 * f;
            cos.push(a.cos() * scaling);
            sin.push(a.sin() * scaling);
        }
    }
    (cos, sin)
}

/// Rotates the rotary part of every head of `x: [tokens, cols]` in place.
pub(crate) fn rope(
    x: &mut [f32],
    cols: usize,
    cos: &[f32],
    sin: &[f32],
    layout: RopeLayout,
    at: RopeApply,
) {
    let half = if x.is_empty() {
        0
    } else {
        cos.len() / (x.len() / cols)
    };
    for (t, row) in x.chunks_exact_mut(cols).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for h in 0..at.num_heads {
            let head = &mut row[h * at.head_stride + at.offset..][..2 * half];
            for i in 0..half {
                let (a, b) = match layout {
                    RopeLayout::Half => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (head[a], head[b]);
                head[a] = x1 * c[i] - x2 * s[i];
                head[b] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/// Splits each head of `[T, heads*(a+b)]` into `[T, heads*a]` and `[T, heads*b]`.
pub(crate) fn split_heads(x: &[f32], heads: usize, a: usize, b: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / (heads * (a + b));
    let mut xa = Vec::with_capacity(rows * heads * a);
    let mut xb = Vec::with_capacity(rows * heads * b);
    for head in x.chunks_exact(a + b) {
        xa.extend_from_slice(&head[..a]);
        xb.extend_from_slice(&head[a..]);
    }
    (xa, xb)
}

/// Joins each `da`-wide head of `a` with the same `db`-wide head of `b`, row by row.
pub(crate) fn concat_heads(a: &[f32], da: usize, b: &[f32], db: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    if da == 0 {
        out.extend_from_slice(b);
    } else if db == 0 {
        out.extend_from_slice(a);
    } else {
        for (ha, hb) in a.chunks_exact(da).zip(b.chunks_exact(db)) {
            out.extend_from_slice(ha);
            out.extend_from_slice(hb);
        }
    }
    out
}

/// Joins each `da`-wide head of `a` (`heads` per row, `rows` rows) with its row's `ds`-wide
/// `shared` part.
pub(crate) fn concat_shared(
    a: &[f32],
    shared: &[f32],
    rows: usize,
    (heads, da, ds): (usize, usize, usize),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * heads * (da + ds));
    for r in 0..rows {
        for h in 0..heads {
            out.extend_from_slice(&a[(r * heads + h) * da..][..da]);
            out.extend_from_slice(&shared[r * ds..][..ds]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_per_group() {
        let x = [3.0, 4.0, 1.0, 1.0];
        let out = rms_norm(&x, &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f32).sqrt();
        assert!((out[0] - 3.0 * inv).abs() < 1e-6 && (out[1] - 8.0 * inv).abs() < 1e-6);
        assert!((out[2] - 1.0).abs() < 1e-6 && (out[3] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn rope_half_and_interleaved_rotate_the_right_pairs() {
        // One token, one head of 4: position angle pi/2 for the first pair, 0 for the second.
        let (cos, sin) = (vec![0.0, 1.0], vec![1.0, 0.0]);
        let at = RopeApply {
            num_heads: 1,
            head_stride: 4,
            offset: 0,
        };
        let mut h = vec![1.0, 2.0, 3.0, 4.0];
        rope(&mut h, 4, &cos, &sin, RopeLayout::Half, at);
        // pair (0,2) rotated by 90°: (1,3) -> (-3,1); pair (1,3) unchanged.
        assert_eq!(h, vec![-3.0, 2.0, 1.0, 4.0]);
        let mut i = vec![1.0, 2.0, 3.0, 4.0];
        rope(&mut i, 4, &cos, &sin, RopeLayout::Interleaved, at);
        // pair (0,1) rotated by 90°: (1,2) -> (-2,1); pair (2,3) unchanged.
        assert_eq!(i, vec![-2.0, 1.0, 3.0, 4.0]);
    }

    #[test]
    fn rope_respects_offset_and_stride() {
        let (cos, sin) = (vec![0.0], vec![1.0]);
        let at = RopeApply {
            num_heads: 2,
            head_stride: 3,
            offset: 1,
        };
        let mut x = vec![9.0, 1.0, 2.0, 8.0, 3.0, 4.0];
        rope(&mut x, 6, &cos, &sin, RopeLayout::Half, at);
        assert_eq!(x, vec![9.0, -2.0, 1.0, 8.0, -4.0, 3.0]);
    }

    #[test]
    fn concat_heads_undoes_split_heads() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 2 rows, 2 heads, a=2, b=1
        let (a, b) = split_heads(&x, 2, 2, 1);
        assert_eq!(a, vec![0.0, 1.0, 3.0, 4.0, 6.0, 7.0, 9.0, 10.0]);
        assert_eq!(b, vec![2.0, 5.0, 8.0, 11.0]);
        assert_eq!(concat_heads(&a, 2, &b, 1), x);
        assert_eq!(concat_heads(&a, 2, &[], 0), a);
        assert_eq!(concat_heads(&[], 0, &b, 1), b);
    }

    #[test]
    fn concat_shared_gives_every_head_the_rows_shared_part() {
        // 2 rows, 2 heads of 2, a shared part of 1.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let shared = [10.0, 20.0];
        assert_eq!(
            concat_shared(&a, &shared, 2, (2, 2, 1)),
            vec![
                1.0, 2.0, 10.0, 3.0, 4.0, 10.0, 5.0, 6.0, 20.0, 7.0, 8.0, 20.0
            ]
        );
    }
}

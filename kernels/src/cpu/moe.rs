//! Mixture-of-experts routing and expert execution on the CPU.
//!
//! Routing follows transformers' rules exactly (softmax or sigmoid scores, optional bias used only
//! for selection, group-limited selection, renormalisation, scaling). Expert execution groups the
//! step's tokens by expert so that each active expert's weights stream from memory once per step,
//! whatever the batch size.

use super::linear::linear;
use super::ops::{sigmoid, silu_mul};
use crate::{BackendError, GroupScore, HostTensor, Result, RouterParams, Scoring};

/// For each token, `top_k` (expert, weight) pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuRouting {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Indices of the `k` largest values (ties broken towards the lower index).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

pub(crate) fn route(logits: &[f32], p: &RouterParams, bias: Option<&[f32]>) -> Result<CpuRouting> {
    let e = p.num_experts;
    if e == 0 || p.top_k == 0 || p.top_k > e || !logits.len().is_multiple_of(e) {
        return Err(BackendError::invalid(
            "route",
            format!(
                "top-{} of {e} experts over {} logits",
                p.top_k,
                logits.len()
            ),
        ));
    }
    if let Some(b) = bias
        && b.len() != e
    {
        return Err(BackendError::shape(
            "route",
            format!("bias of {} for {e} experts", b.len()),
        ));
    }
    let tokens = logits.len() / e;
    let mut out = CpuRouting {
        top_k: p.top_k,
        experts: Vec::with_capacity(tokens * p.top_k),
        weights: Vec::with_capacity(tokens * p.top_k),
    };
    for row in logits.chunks_exact(e) {
        let scores: Vec<f32> = match p.scoring {
            Scoring::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let ex: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = ex.iter().sum();
                ex.into_iter().map(|v| v / sum).collect()
            }
            Scoring::Sigmoid => row.iter().map(|v| sigmoid(*v)).collect(),
        };
        let mut choice: Vec<f32> = match bias {
            Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => scores.clone(),
        };
        if let Some((n_group, topk_group, how)) = p.groups
            && n_group > 1
        {
            if !e.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
                return Err(BackendError::invalid(
                    "route",
                    format!("{e} experts in {n_group} groups, keeping {topk_group}"),
                ));
            }
            let size = e / n_group;
            let group_scores: Vec<f32> = choice
                .chunks_exact(size)
                .map(|g| match how {
                    GroupScore::Max => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    GroupScore::SumTop2 => top_indices(g, 2).iter().map(|&i| g[i]).sum(),
                })
                .collect();
            let keep = top_indices(&group_scores, topk_group);
            // DeepSeek-V2 masks with 0 (its softmax scores are positive), V3 with -inf (its biased
            // scores may be negative); -inf is right for both.
            for (gi, g) in choice.chunks_exact_mut(size).enumerate() {
                if !keep.contains(&gi) {
                    g.fill(f32::NEG_INFINITY);
                }
            }
        }
        let chosen = top_indices(&choice, p.top_k);
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        if p.normalize {
            let denom: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|v| *v /= denom);
        }
        out.experts.extend(chosen.iter().map(|&i| i as u32));
        out.weights.extend(w.into_iter().map(|v| v * p.scaling));
    }
    Ok(out)
}

pub(crate) fn expert_counts(r: &CpuRouting, num_experts: usize) -> Vec<u32> {
    let mut counts = vec![0u32; num_experts];
    for &e in &r.experts {
        if let Some(c) = counts.get_mut(e as usize) {
            *c += 1;
        }
    }
    counts
}

/// One expert's three projections as host tensors.
pub(crate) struct CpuExpert<'a> {
    pub gate: &'a HostTensor,
    pub up: &'a HostTensor,
    pub down: &'a HostTensor,
}

pub(crate) fn moe(
    x: &[f32],
    hidden: usize,
    r: &CpuRouting,
    experts: &[Option<CpuExpert<'_>>],
) -> Result<Vec<f32>> {
    let tokens = x.len() / hidden;
    if r.experts.len() != tokens * r.top_k {
        return Err(BackendError::shape(
            "moe",
            format!(
                "routing for {} tokens, activations for {tokens}",
                r.experts.len() / r.top_k.max(1)
            ),
        ));
    }
    // Bucket (token, weight) by expert so each expert runs once over all of its tokens.
    let mut buckets: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts.len()];
    for (i, (&e, &w)) in r.experts.iter().zip(&r.weights).enumerate() {
        let bucket = buckets.get_mut(e as usize).ok_or_else(|| {
            BackendError::invalid(
                "moe",
                format!("expert {e} routed, but the layer has {}", experts.len()),
            )
        })?;
        bucket.push((i / r.top_k, w));
    }
    let mut out = vec![0f32; x.len()];
    for (e, bucket) in buckets.iter().enumerate() {
        let Some(ex) = &experts[e] else { continue };
        if bucket.is_empty() {
            continue;
        }
        let mut xs = Vec::with_capacity(bucket.len() * hidden);
        for &(t, _) in bucket {
            xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let inter = ex.gate.shape()[0];
        let g = linear(&xs, hidden, ex.gate.view(), inter, None);
        let u = linear(&xs, hidden, ex.up.view(), inter, None);
        let h = silu_mul(&g, &u);
        let y = linear(&h, inter, ex.down.view(), hidden, None);
        for (row, &(t, w)) in y.chunks_exact(hidden).zip(bucket) {
            for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
                *o += w * v;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(scoring: Scoring) -> RouterParams {
        RouterParams {
            num_experts: 4,
            top_k: 2,
            scoring,
            normalize: false,
            groups: None,
            scaling: 1.0,
        }
    }

    #[test]
    fn softmax_top2_with_and_without_renormalisation() {
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        let r = route(&logits, &params(Scoring::Softmax), None).unwrap();
        assert_eq!(r.experts, vec![1, 2]);
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((r.weights[0] - 2f32.exp() / z).abs() < 1e-6);
        let mut p = params(Scoring::Softmax);
        p.normalize = true;
        let r = route(&logits, &p, None).unwrap();
        assert!((r.weights[0] + r.weights[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        let bias = [0.0f32, 0.0, 0.0, 5.0];
        let r = route(&logits, &params(Scoring::Sigmoid), Some(&bias)).unwrap();
        assert_eq!(r.experts, vec![3, 1]);
        assert!((r.weights[0] - sigmoid(-1.0)).abs() < 1e-6);
    }

    #[test]
    fn grouped_routing_only_picks_from_best_groups() {
        // Groups {0,1} and {2,3}; group 1 wins on sum of top-2 even though expert 0 is the best.
        let logits = [3.0f32, -3.0, 2.0, 2.0];
        let mut p = params(Scoring::Sigmoid);
        p.groups = Some((2, 1, GroupScore::SumTop2));
        p.scaling = 2.5;
        let r = route(&logits, &p, None).unwrap();
        assert_eq!(r.experts, vec![2, 3]);
        assert!((r.weights[0] - 2.5 * sigmoid(2.0)).abs() < 1e-6);
        // With the max rule, group 0 wins.
        p.groups = Some((2, 1, GroupScore::Max));
        let r = route(&logits, &p, None).unwrap();
        assert_eq!(r.experts, vec![0, 1]);
    }

    #[test]
    fn bad_router_arguments_are_errors() {
        let mut p = params(Scoring::Softmax);
        p.top_k = 5;
        assert!(route(&[0.0; 4], &p, None).is_err());
        assert!(route(&[0.0; 4], &params(Scoring::Softmax), Some(&[0.0; 3])).is_err());
    }
}

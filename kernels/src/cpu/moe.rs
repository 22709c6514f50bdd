//! Mixture-of-experts routing and expert execution on the CPU.
//!
//! Routing follows transformers' rules exactly (softmax or sigmoid scores, optional bias used only
//! for selection, group-limited selection, renormalisation, scaling). Expert execution groups the
//! step's tokens by expert so that each active expert's weights stream from memory once per step,
//! whatever the batch size, and all of a layer's expert work runs as one parallel region.

use std::ops::Range;

use rayon::prelude::*;

use super::linear::{Acts, Isa, Mat, rows_times_x, worth_parallel};
use super::ops::{sigmoid, silu};
use super::scratch;
use crate::{BackendError, GroupScore, HostTensor, Result, RouterParams, Scoring, WeightView};

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

/// One expert's (or a dense MLP's) three projections as host tensors.
pub(crate) struct CpuExpert<'a> {
    pub gate: &'a HostTensor,
    pub up: &'a HostTensor,
    pub down: &'a HostTensor,
}

impl CpuExpert<'_> {
    /// The intermediate width, after checking the three shapes against `hidden`.
    fn inter(&self, hidden: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let i = match self.gate.shape() {
            [i, h] if *h == hidden => *i,
            s => {
                return Err(BackendError::shape(
                    "moe",
                    format!("{}: gate {s:?} for hidden {hidden}", what()),
                ));
            }
        };
        if self.up.shape() != [i, hidden] || self.down.shape() != [hidden, i] {
            return Err(BackendError::shape(
                "moe",
                format!(
                    "{}: gate [{i}, {hidden}], up {:?}, down {:?}",
                    what(),
                    self.up.shape(),
                    self.down.shape()
                ),
            ));
        }
        Ok(i)
    }
}

/// Intermediate columns per slice are a multiple of this (whole SIMD vectors, and 256-byte runs of
/// bf16 in each row of `down`).
const SLICE_ALIGN: usize = 128;

/// Slices to cut each of `n_active` experts of width `inter` into: enough pieces for four per
/// thread, so threads finish together even when experts are few and large (Mixtral at batch 1),
/// but whole experts when there are plenty (Qwen3's top-8), since a slice reads `down` in
/// column windows rather than whole rows.
fn slices_per_expert(inter: usize, n_active: usize, threads: usize) -> usize {
    let want = (4 * threads).div_ceil(n_active.max(1));
    want.clamp(1, (inter / SLICE_ALIGN).max(1))
}

/// One parallel task: intermediate columns `cols` of an MLP for some of the step's tokens.
struct Job<'a> {
    gate: WeightView<'a>,
    up: WeightView<'a>,
    down: WeightView<'a>,
    inter: usize,
    cols: Range<usize>,
    /// (token row of `x`, weight of this MLP's output for it).
    tokens: &'a [(usize, f32)],
}

/// Runs one job: `out[r · nt + j] = Σ_{i ∈ cols} down[r, i] · silu(gate_i · x_j) · (up_i · x_j)`
/// for its `nt` tokens `j` (weight-row-major, as `rows_times_x` writes).
fn run_job(isa: Isa, x: &[f32], hidden: usize, job: &Job<'_>, out: &mut [f32]) {
    let (nt, s) = (job.tokens.len(), job.cols.len());
    scratch::with_buf(|xs| {
        for &(t, _) in job.tokens {
            xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        scratch::with_zeroed(3 * s * nt, |buf| {
            let (g, rest) = buf.split_at_mut(s * nt);
            let (u, h) = rest.split_at_mut(s * nt);
            rows_times_x(
                isa,
                Mat::full(job.gate, hidden),
                job.cols.clone(),
                Acts::rows(xs, hidden),
                g,
            );
            rows_times_x(
                isa,
                Mat::full(job.up, hidden),
                job.cols.clone(),
                Acts::rows(xs, hidden),
                u,
            );
            // `h` is token-major `[nt, s]`: the activations of the down projection.
            for i in 0..s {
                for j in 0..nt {
                    h[j * s + i] = silu(g[i * nt + j]) * u[i * nt + j];
                }
            }
            let down = Mat {
                w: job.down,
                offset: job.cols.start,
                stride: job.inter,
            };
            rows_times_x(isa, down, 0..hidden, Acts::rows(h, s), out);
        })
    })
}

/// Runs `jobs` (in parallel when worth it) and adds each token's weighted results into `y`.
fn run_jobs(isa: Isa, x: &[f32], hidden: usize, jobs: &[Job<'_>], y: &mut [f32]) {
    let sizes: Vec<usize> = jobs.iter().map(|j| j.tokens.len() * hidden).collect();
    let macs: usize = jobs
        .iter()
        .map(|j| 3 * j.cols.len() * hidden * j.tokens.len())
        .sum();
    scratch::with_zeroed(sizes.iter().sum(), |partial| {
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(jobs.len());
        let mut rest: &mut [f32] = partial;
        for &n in &sizes {
            let (p, r) = std::mem::take(&mut rest).split_at_mut(n);
            parts.push(p);
            rest = r;
        }
        if worth_parallel(macs) {
            jobs.par_iter()
                .zip(parts.par_iter_mut())
                .for_each(|(job, out)| run_job(isa, x, hidden, job, out));
        } else {
            for (job, out) in jobs.iter().zip(parts.iter_mut()) {
                run_job(isa, x, hidden, job, out);
            }
        }
        for (job, out) in jobs.iter().zip(&parts) {
            let nt = job.tokens.len();
            for (j, &(t, w)) in job.tokens.iter().enumerate() {
                let row = &mut y[t * hidden..(t + 1) * hidden];
                for (r, v) in row.iter_mut().enumerate() {
                    *v += w * out[r * nt + j];
                }
            }
        }
    })
}

/// Cuts `tokens` of an MLP into `slices` jobs over its intermediate columns.
fn push_jobs<'a>(
    jobs: &mut Vec<Job<'a>>,
    e: &CpuExpert<'a>,
    inter: usize,
    slices: usize,
    tokens: &'a [(usize, f32)],
) {
    let width = inter
        .div_ceil(slices)
        .next_multiple_of(SLICE_ALIGN)
        .min(inter);
    let mut start = 0;
    while start < inter {
        let end = (start + width).min(inter);
        jobs.push(Job {
            gate: e.gate.view(),
            up: e.up.view(),
            down: e.down.view(),
            inter,
            cols: start..end,
            tokens,
        });
        start = end;
    }
}

/// `Σ_e weight(t, e) · expert_e(x_t)` over each token's routed experts that are present here.
///
/// Tokens are grouped by expert, so every active expert's weights stream from memory once per
/// step whatever the batch; all experts' work then runs as one parallel region of jobs (whole
/// experts, or column slices of few large ones), so a step pays one thread hand-off per MoE layer
/// rather than three per expert.
pub(crate) fn moe(
    x: &[f32],
    hidden: usize,
    r: &CpuRouting,
    experts: &[Option<CpuExpert<'_>>],
) -> Result<Vec<f32>> {
    moe_with(Split::current(), x, hidden, r, experts)
}

/// How work is cut: the kernels to run and the thread count that slicing plans for.
#[derive(Clone, Copy, Debug)]
struct Split {
    isa: Isa,
    threads: usize,
}

impl Split {
    fn current() -> Self {
        Split {
            isa: Isa::best(),
            threads: rayon::current_num_threads(),
        }
    }
}

fn moe_with(
    split: Split,
    x: &[f32],
    hidden: usize,
    r: &CpuRouting,
    experts: &[Option<CpuExpert<'_>>],
) -> Result<Vec<f32>> {
    let tokens = x.len() / hidden.max(1);
    if r.experts.len() != tokens * r.top_k {
        return Err(BackendError::shape(
            "moe",
            format!(
                "routing for {} tokens, activations for {tokens}",
                r.experts.len() / r.top_k.max(1)
            ),
        ));
    }
    // Counting sort of (token, weight) by expert: `order[starts[e]..starts[e + 1]]` is expert e's.
    let mut starts = vec![0usize; experts.len() + 1];
    for &e in &r.experts {
        let slot = starts.get_mut(e as usize + 1).ok_or_else(|| {
            BackendError::invalid(
                "moe",
                format!("expert {e} routed, but the layer has {}", experts.len()),
            )
        })?;
        *slot += 1;
    }
    for e in 0..experts.len() {
        starts[e + 1] += starts[e];
    }
    let mut fill = starts.clone();
    let mut order = vec![(0usize, 0f32); r.experts.len()];
    for (i, (&e, &w)) in r.experts.iter().zip(&r.weights).enumerate() {
        order[fill[e as usize]] = (i / r.top_k, w);
        fill[e as usize] += 1;
    }
    let mut active = Vec::new();
    for (e, ex) in experts.iter().enumerate() {
        if let Some(ex) = ex
            && starts[e + 1] > starts[e]
        {
            let inter = ex.inter(hidden, &|| format!("expert {e}"))?;
            active.push((ex, inter, &order[starts[e]..starts[e + 1]]));
        }
    }
    let mut jobs = Vec::new();
    for &(ex, inter, toks) in &active {
        let slices = slices_per_expert(inter, active.len(), split.threads);
        push_jobs(&mut jobs, ex, inter, slices, toks);
    }
    let mut y = super::pool::zeroed(x.len());
    run_jobs(split.isa, x, hidden, &jobs, &mut y);
    Ok(y)
}

/// A dense gated MLP `down(silu(gate(x)) · up(x))` over every token, as one parallel region of
/// column slices (the same jobs as [`moe`]).
pub(crate) fn mlp(x: &[f32], hidden: usize, e: &CpuExpert<'_>) -> Result<Vec<f32>> {
    mlp_with(Split::current(), x, hidden, e)
}

fn mlp_with(split: Split, x: &[f32], hidden: usize, e: &CpuExpert<'_>) -> Result<Vec<f32>> {
    let inter = e.inter(hidden, &|| "mlp".to_string())?;
    let tokens: Vec<(usize, f32)> = (0..x.len() / hidden.max(1)).map(|t| (t, 1.0)).collect();
    let mut jobs = Vec::new();
    let slices = slices_per_expert(inter, 1, split.threads);
    push_jobs(&mut jobs, e, inter, slices, &tokens);
    let mut y = super::pool::zeroed(x.len());
    run_jobs(split.isa, x, hidden, &jobs, &mut y);
    Ok(y)
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

    /// Deterministic values in [-0.5, 0.5), exactly representable in bf16.
    fn vals(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let h = (i ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(0x2545_F491_4F6C_DD1D);
                half::bf16::from_f32(((h >> 40) % 1024) as f32 / 1024.0 - 0.5).to_f32()
            })
            .collect()
    }

    fn host(v: &[f32], shape: Vec<usize>, bf16: bool) -> HostTensor {
        if bf16 {
            let bytes: Vec<u8> = v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect();
            HostTensor::from_bytes(&bytes, crate::DType::BF16, shape).unwrap()
        } else {
            HostTensor::from_f32(v.to_vec(), shape).unwrap()
        }
    }

    /// `down(silu(gate x) · up x)` in f64.
    fn mlp_ref(
        x: &[f32],
        g: &[f32],
        u: &[f32],
        d: &[f32],
        hidden: usize,
        inter: usize,
    ) -> Vec<f64> {
        let h: Vec<f64> = (0..inter)
            .map(|i| {
                let dot = |w: &[f32]| -> f64 {
                    (0..hidden)
                        .map(|c| w[i * hidden + c] as f64 * x[c] as f64)
                        .sum()
                };
                let gv = dot(g);
                gv / (1.0 + (-gv).exp()) * dot(u)
            })
            .collect();
        (0..hidden)
            .map(|r| (0..inter).map(|i| d[r * inter + i] as f64 * h[i]).sum())
            .collect()
    }

    #[test]
    fn moe_matches_a_per_token_reference_for_every_split_and_dtype() {
        let (hidden, inter, n_exp, tokens, top_k) = (64, 384, 6, 5, 2);
        let x = vals(tokens * hidden, 1);
        let w: Vec<[Vec<f32>; 3]> = (0..n_exp as u64)
            .map(|e| {
                [
                    vals(inter * hidden, 10 + e),
                    vals(inter * hidden, 20 + e),
                    vals(hidden * inter, 30 + e),
                ]
            })
            .collect();
        // Token t picks experts t % 6 and (t + 2) % 6; expert 4 lives on another rank.
        let routing = CpuRouting {
            top_k,
            experts: (0..tokens)
                .flat_map(|t| [(t % n_exp) as u32, ((t + 2) % n_exp) as u32])
                .collect(),
            weights: (0..tokens)
                .flat_map(|t| [0.75, 0.25 + t as f32 * 0.01])
                .collect(),
        };
        let mut want = vec![0f64; tokens * hidden];
        for t in 0..tokens {
            for j in 0..top_k {
                let e = routing.experts[t * top_k + j] as usize;
                if e == 4 {
                    continue;
                }
                let y = mlp_ref(
                    &x[t * hidden..][..hidden],
                    &w[e][0],
                    &w[e][1],
                    &w[e][2],
                    hidden,
                    inter,
                );
                for (o, v) in want[t * hidden..][..hidden].iter_mut().zip(y) {
                    *o += routing.weights[t * top_k + j] as f64 * v;
                }
            }
        }
        for bf16 in [false, true] {
            let tensors: Vec<[HostTensor; 3]> = w
                .iter()
                .map(|[g, u, d]| {
                    [
                        host(g, vec![inter, hidden], bf16),
                        host(u, vec![inter, hidden], bf16),
                        host(d, vec![hidden, inter], bf16),
                    ]
                })
                .collect();
            let experts: Vec<Option<CpuExpert<'_>>> = tensors
                .iter()
                .enumerate()
                .map(|(e, [g, u, d])| {
                    (e != 4).then_some(CpuExpert {
                        gate: g,
                        up: u,
                        down: d,
                    })
                })
                .collect();
            for isa in crate::cpu::linear::tests::isas() {
                // 1 thread: whole experts; 16: every expert cut into three column slices.
                for threads in [1, 2, 16] {
                    let split = Split { isa, threads };
                    let got = moe_with(split, &x, hidden, &routing, &experts).unwrap();
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "{split:?} bf16={bf16} [{i}]: {g} vs {e}"
                        );
                    }
                }
                let dense = mlp_with(
                    Split { isa, threads: 16 },
                    &x,
                    hidden,
                    experts[0].as_ref().unwrap(),
                )
                .unwrap();
                for t in 0..tokens {
                    let y = mlp_ref(
                        &x[t * hidden..][..hidden],
                        &w[0][0],
                        &w[0][1],
                        &w[0][2],
                        hidden,
                        inter,
                    );
                    for (g, e) in dense[t * hidden..][..hidden].iter().zip(y) {
                        assert!(
                            (*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "mlp {isa:?}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn moe_rejects_mismatched_expert_shapes_and_unknown_experts() {
        let g = HostTensor::from_f32(vec![0.0; 8 * 4], vec![8, 4]).unwrap();
        let d = HostTensor::from_f32(vec![0.0; 4 * 7], vec![4, 7]).unwrap();
        let bad = [Some(CpuExpert {
            gate: &g,
            up: &g,
            down: &d,
        })];
        let r = CpuRouting {
            top_k: 1,
            experts: vec![0],
            weights: vec![1.0],
        };
        let err = moe(&[0.0; 4], 4, &r, &bad).unwrap_err();
        assert!(err.to_string().contains("expert 0"), "{err}");
        let r = CpuRouting {
            top_k: 1,
            experts: vec![3],
            weights: vec![1.0],
        };
        assert!(moe(&[0.0; 4], 4, &r, &bad).is_err());
    }

    #[test]
    fn bad_router_arguments_are_errors() {
        let mut p = params(Scoring::Softmax);
        p.top_k = 5;
        assert!(route(&[0.0; 4], &p, None).is_err());
        assert!(route(&[0.0; 4], &params(Scoring::Softmax), Some(&[0.0; 3])).is_err());
    }
}

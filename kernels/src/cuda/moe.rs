//! Mixture-of-experts routing and expert execution on the GPU.
//!
//! Routing runs on the device (one thread per token, `route` in moe.cu) and follows the CPU
//! backend's rules exactly. Expert execution groups the step's tokens by expert: today the
//! grouping is planned on the host from a copy of the routing decisions (`T × top_k` small
//! integers, one device-to-host copy per MoE layer), then for each local expert with tokens the
//! rows are gathered, the gated MLP runs through cuBLAS, and the outputs are scattered back with
//! their routing weights. Planning on the device (a counting sort) would remove that copy.

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

use super::device::{CudaBackend, CudaTensor, CudaWeight, grid_1d, grid_rows, to_u32};
use crate::{BackendError, ExpertWeights, GroupScore, Result, RouterParams, Scoring};

/// `ROUTE_MAX_K` and `ROUTE_MAX_GROUPS` of moe.cu (sizes of the kernel's local arrays).
const ROUTE_MAX_K: usize = 32;
const ROUTE_MAX_GROUPS: usize = 64;

/// For each token, `top_k` (expert, weight) pairs, on the device.
pub struct CudaRouting {
    tokens: usize,
    top_k: usize,
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
}

/// Scalars of `route`; the same fields in the same order as `RouteArgs` in moe.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RouteArgs {
    tokens: u32,
    num_experts: u32,
    top_k: u32,
    sigmoid: u32,
    normalize: u32,
    has_bias: u32,
    n_group: u32,
    topk_group: u32,
    group_sum_top2: u32,
    scaling: f32,
}

// SAFETY: `repr(C)` with only 4-byte scalar fields, matching the C struct field for field; passed
// by value.
unsafe impl DeviceRepr for RouteArgs {}

impl CudaBackend {
    pub(super) fn route_impl(
        &self,
        logits: &CudaTensor,
        p: &RouterParams,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaRouting> {
        const OP: &str = "route";
        let e = p.num_experts;
        if e == 0 || p.top_k == 0 || p.top_k > e || logits.cols != e {
            return Err(BackendError::invalid(
                OP,
                format!(
                    "top-{} of {e} experts over {}x{} logits",
                    p.top_k, logits.rows, logits.cols
                ),
            ));
        }
        let bias = bias
            .map(|b| b.vector("route bias").map(|v| (b, v)))
            .transpose()?;
        if let Some((b, _)) = bias
            && b.shape[0] != e
        {
            return Err(BackendError::shape(
                OP,
                format!("bias of {} for {e} experts", b.shape[0]),
            ));
        }
        let (n_group, topk_group, how) = match p.groups {
            Some((n, k, how)) if n > 1 => {
                if !e.is_multiple_of(n) || k == 0 || k > n {
                    return Err(BackendError::invalid(
                        OP,
                        format!("{e} experts in {n} groups, keeping {k}"),
                    ));
                }
                (n, k, how)
            }
            _ => (1, 1, GroupScore::Max),
        };
        if p.top_k > ROUTE_MAX_K || n_group > ROUTE_MAX_GROUPS {
            return Err(BackendError::Unsupported {
                op: "route with top_k over 32 or more than 64 expert groups",
                backend: "cuda",
            });
        }
        let t = logits.rows;
        let mut ids = self.zeros::<u32>(OP, t * p.top_k)?;
        let mut weights = self.zeros::<f32>(OP, t * p.top_k)?;
        if t > 0 {
            let mut scratch = self.zeros::<f32>(OP, 2 * t * e)?;
            let args = RouteArgs {
                tokens: to_u32(OP, t)?,
                num_experts: to_u32(OP, e)?,
                top_k: p.top_k as u32,
                sigmoid: u32::from(p.scoring == Scoring::Sigmoid),
                normalize: u32::from(p.normalize),
                has_bias: u32::from(bias.is_some()),
                n_group: n_group as u32,
                topk_group: topk_group as u32,
                group_sum_top2: u32::from(how == GroupScore::SumTop2),
                scaling: p.scaling,
            };
            to_u32(OP, 2 * t * e)?;
            let mut b = self.stream.launch_builder(self.func(OP)?);
            b.arg(&mut ids)
                .arg(&mut weights)
                .arg(&mut scratch)
                .arg(&logits.data);
            // Without a bias the kernel never reads that pointer; the logits stand in for it.
            match bias {
                Some((_, v)) => b.arg(v),
                None => b.arg(&logits.data),
            };
            b.arg(&args);
            // SAFETY: route(u32* ids, float* weights, float* scratch, const float* logits,
            // const float* bias, RouteArgs a): one thread per token; ids and weights hold
            // tokens*top_k, scratch 2*tokens*experts, logits tokens*experts (cols == experts,
            // checked); bias holds experts floats when has_bias; top_k <= 32 and n_group <= 64
            // fit the kernel's local arrays (checked); experts divide into n_group groups.
            unsafe { b.launch(grid_1d(t)) }.map_err(|e| BackendError::device(OP, e))?;
        }
        Ok(CudaRouting {
            tokens: t,
            top_k: p.top_k,
            ids,
            weights,
        })
    }

    /// The routing decisions on the host: `(experts, weights)`, `top_k` per token in token order
    /// (the layout of the CPU backend's `CpuRouting`).
    pub fn routing_to_host(&self, r: &CudaRouting) -> Result<(Vec<u32>, Vec<f32>)> {
        let n = r.tokens * r.top_k;
        Ok((
            self.download("routing_to_host", &r.ids, n)?,
            self.download("routing_to_host", &r.weights, n)?,
        ))
    }

    pub(super) fn expert_counts_impl(
        &self,
        r: &CudaRouting,
        num_experts: usize,
    ) -> Result<Vec<u32>> {
        let (ids, _) = self.routing_to_host(r)?;
        let mut counts = vec![0u32; num_experts];
        for e in ids {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        Ok(counts)
    }

    pub(super) fn moe_impl(
        &self,
        x: &CudaTensor,
        r: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        const OP: &str = "moe";
        if x.rows != r.tokens {
            return Err(BackendError::shape(
                OP,
                format!("{} rows for routing of {} tokens", x.rows, r.tokens),
            ));
        }
        let hidden = x.cols;
        for (i, e) in experts.iter().enumerate() {
            if let Some(e) = e {
                let (inter, h) = e.gate.matrix(OP)?;
                if h != hidden || e.up.shape != [inter, hidden] || e.down.shape != [hidden, inter] {
                    return Err(BackendError::shape(
                        OP,
                        format!(
                            "expert {i}: gate {:?}, up {:?}, down {:?} for hidden {hidden}",
                            e.gate.shape, e.up.shape, e.down.shape
                        ),
                    ));
                }
            }
        }
        // Host plan: for each local expert, its tokens and their weights, laid out expert after
        // expert in one buffer so that one upload serves every expert.
        let (ids, weights) = self.routing_to_host(r)?;
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![Default::default(); experts.len()];
        for (i, (&e, &w)) in ids.iter().zip(&weights).enumerate() {
            if let Some((rows, ws)) = per_expert.get_mut(e as usize)
                && experts[e as usize].is_some()
            {
                rows.push((i / r.top_k) as u32);
                ws.push(w);
            }
        }
        let rows_all: Vec<u32> = per_expert.iter().flat_map(|(r, _)| r.clone()).collect();
        let ws_all: Vec<f32> = per_expert.iter().flat_map(|(_, w)| w.clone()).collect();
        let mut out = self.tensor(OP, x.rows, hidden)?;
        if rows_all.is_empty() || hidden == 0 {
            return Ok(out);
        }
        let rows_dev = self.upload(OP, &rows_all)?;
        let ws_dev = self.upload(OP, &ws_all)?;
        let cols = to_u32(OP, hidden)?;
        let mut start = 0;
        for (e, (rows, _)) in experts.iter().zip(&per_expert) {
            let (Some(e), n) = (e, rows.len()) else {
                continue;
            };
            if n == 0 {
                continue;
            }
            let idx = rows_dev.slice(start..start + n);
            let xs = self.gather_dev(x, &idx, n)?;
            let h = self.silu_mul_impl(
                &self.linear_impl(&xs, e.gate, None)?,
                &self.linear_impl(&xs, e.up, None)?,
            )?;
            let y = self.linear_impl(&h, e.down, None)?;
            let w = ws_dev.slice(start..start + n);
            let mut b = self.stream.launch_builder(self.func("scatter_add_rows")?);
            b.arg(&mut out.data)
                .arg(&y.data)
                .arg(&idx)
                .arg(&w)
                .arg(&cols);
            // SAFETY: scatter_add_rows(float* out, const float* y, const u32* rows,
            // const float* w, u32 cols): one block per routed token; y holds n*cols floats,
            // rows and w hold n entries, every row < x.rows (a token index of the routing, which
            // has x.rows tokens, checked) and distinct within this expert, so no two blocks
            // write the same row.
            unsafe { b.launch(grid_rows(n, 256)) }.map_err(|e| BackendError::device(OP, e))?;
            start += n;
        }
        Ok(out)
    }
}

//! Mixture-of-experts routing and expert counts on the GPU; expert execution is in
//! `moe_experts.rs`.
//!
//! Routing runs on the device (one thread per token, `route` in moe.cu) and follows the CPU
//! backend's rules exactly. Expert execution never copies the routing to the host: a one-block
//! kernel groups the routed (token, choice) pairs by expert on the device (a counting sort into
//! contiguous per-expert slots plus a list of 8-slot tiles), grouped kernels run every expert's
//! gated MLP over its tiles (decode-sized steps), and a combine kernel adds each token's experts
//! with their routing weights in routing order, so results do not depend on how the sort ordered
//! tokens. Large steps (prefill) use the same device plan but run one cuBLAS product per expert on
//! tensor cores, which costs one copy of the per-expert offsets to the host; `moe_experts.rs`
//! says where the line is and why.
//!
//! Expert counts for metrics are counted on the device too, all MoE layers of a step into one
//! tensor with one launch ([`crate::Backend::expert_counts_into`]), which a graph can hold and
//! the caller copies to the host once.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, CudaTensor, CudaWeight, grid_1d, to_u32};
use super::step::CudaStep;
use crate::{BackendError, GroupScore, Result, RouterParams, Scoring};

/// Routings one `moe_count` launch counts (`COUNT_ROUTINGS` of moe.cu).
const COUNT_ROUTINGS: usize = 64;

/// The kernel argument of `moe_count`; the same fields in the same order as `CountTable` in
/// moe.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct CountTable {
    ids: [u64; COUNT_ROUTINGS],
    pairs: [u32; COUNT_ROUTINGS],
    top_k: [u32; COUNT_ROUTINGS],
}

// SAFETY: `repr(C)` with arrays of 8- then 4-byte scalars, matching the C struct field for field
// (no padding in either); passed by value.
unsafe impl DeviceRepr for CountTable {}

/// `ROUTE_MAX_K` and `ROUTE_MAX_GROUPS` of moe.cu (sizes of the kernel's local arrays).
const ROUTE_MAX_K: usize = 32;
const ROUTE_MAX_GROUPS: usize = 64;

/// For each token, `top_k` (expert, weight) pairs, on the device.
pub struct CudaRouting {
    pub(super) tokens: usize,
    pub(super) top_k: usize,
    /// Experts the router chose among: every id is below it.
    pub(super) num_experts: usize,
    /// `[tokens, top_k]` expert ids and routing weights, in the order the router ranked them.
    pub(super) ids: CudaSlice<u32>,
    pub(super) weights: CudaSlice<f32>,
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
        let mut ids = self.uninit::<u32>(OP, t * p.top_k)?;
        let mut weights = self.uninit::<f32>(OP, t * p.top_k)?;
        if t > 0 {
            let mut scratch = self.uninit::<f32>(OP, 2 * t * e)?;
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
            num_experts: e,
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
        const OP: &str = "expert_counts";
        let mut counts = self.tensor(OP, 1, num_experts)?;
        self.count_into(OP, &[r], None, &mut counts)?;
        let host = self.download(OP, &counts.data, num_experts)?;
        Ok(host.into_iter().map(|c| c as u32).collect())
    }

    pub(super) fn expert_counts_into_impl(
        &self,
        routings: &[&CudaRouting],
        step: &CudaStep,
        counts: &mut CudaTensor,
    ) -> Result<()> {
        const OP: &str = "expert_counts_into";
        if let Some(r) = routings.iter().find(|r| r.tokens != step.rows) {
            return Err(BackendError::shape(
                OP,
                format!(
                    "a routing of {} tokens for a step of {} rows",
                    r.tokens, step.rows
                ),
            ));
        }
        let live = step.live();
        self.count_into(OP, routings, Some(&live), counts)
    }

    /// Zeroes `counts` (`[routings, num_experts]`) and counts each routing's pairs of its rows
    /// before `live[0]` (every row without `live`) into its row: one `moe_count` launch per
    /// [`COUNT_ROUTINGS`] routings, their id addresses passed by value, so the work has no copy
    /// to or from the host and a graph can hold it.
    fn count_into(
        &self,
        op: &'static str,
        routings: &[&CudaRouting],
        live: Option<&CudaView<'_, u32>>,
        counts: &mut CudaTensor,
    ) -> Result<()> {
        let experts = counts.cols;
        crate::backend::check_counts_rows(op, routings.len(), (counts.rows, counts.cols))?;
        if let Some(r) = routings.iter().find(|r| r.num_experts > experts) {
            return Err(BackendError::shape(
                op,
                format!(
                    "a routing over {} experts counted into {experts}",
                    r.num_experts
                ),
            ));
        }
        let total = routings.len() * experts;
        if total == 0 {
            return Ok(());
        }
        self.stream
            .memset_zeros(&mut counts.data.slice_mut(..total))
            .map_err(|e| BackendError::device(op, e))?;
        let e32 = to_u32(op, experts)?;
        for (chunk, group) in routings.chunks(COUNT_ROUTINGS).enumerate() {
            let mut table = CountTable {
                ids: [0; COUNT_ROUTINGS],
                pairs: [0; COUNT_ROUTINGS],
                top_k: [0; COUNT_ROUTINGS],
            };
            for (i, r) in group.iter().enumerate() {
                table.ids[i] = r.ids.device_ptr(&self.stream).0;
                table.pairs[i] = to_u32(op, r.tokens * r.top_k)?;
                table.top_k[i] = to_u32(op, r.top_k)?;
            }
            let most = table.pairs.iter().copied().max().unwrap_or(0);
            if most == 0 {
                continue;
            }
            let offset = chunk * COUNT_ROUTINGS * experts;
            let mut out = counts.data.slice_mut(offset..total);
            let cfg = LaunchConfig {
                grid_dim: (most.div_ceil(256), group.len() as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func("moe_count")?);
            b.arg(&mut out).arg(&table);
            match live {
                Some(l) => b.arg(l),
                None => b.arg(&0u64),
            };
            b.arg(&e32);
            // SAFETY: moe_count(float* counts, CountTable t, const u32* live, u32 num_experts):
            // grid (ceil(max pairs / 256), routings of this chunk <= COUNT_ROUTINGS); t holds
            // each routing's ids address (a live buffer of its tokens*top_k ids: the routings are
            // borrowed for the call, and a graph keeps the buffers it allocated) with its pair
            // count and top_k, and threads past their routing's count return; counts (from this
            // chunk's first row) holds a row of num_experts counters per routing, and only ids
            // below num_experts are counted; live is null or the step's one-entry live count.
            unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(op, e))?;
        }
        Ok(())
    }
}

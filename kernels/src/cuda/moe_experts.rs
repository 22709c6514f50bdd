//! Expert execution on the GPU: `Σ_k w(t,k) · expert_{e(t,k)}(x_t)` over the experts this rank
//! owns, with the grouping planned on the device (kernels in the second half of moe.cu).
//!
//! 1. `moe_plan` (one block) sorts the routed (token, choice) pairs by expert into contiguous
//!    slots, records each pair's slot, each slot's token and weight, the per-expert offsets, and a
//!    list of tiles of up to [`TM`] slots of one expert.
//! 2. Decode-sized steps run `moe_gate_up` (`h = silu(x·gateᵀ) ⊙ (x·upᵀ)` for every slot) and
//!    `moe_down` (`y = h·downᵀ`) over the tiles; their grids are sized by an upper bound of the
//!    tile count that the host computes from the step's shape ([`max_tiles`]), and blocks past the
//!    real count exit at once, so nothing is copied to the host.
//! 3. `moe_combine` adds each token's `y` rows with their routing weights, in routing order.
//!
//! Larger steps take the same plan with tiles of [`MMA_TM`] slots and the tensor-core kernels of
//! moe_mma.cu (`moe_gate_up_mma`, `moe_down_mma`): the same launches, the same arguments, no copy
//! to the host; see [`use_grouped`] for the line. On a GPU older than Ampere (no `mma.sync` for
//! tf32) they instead download the per-expert offsets (one small copy, one synchronisation) and
//! run three cuBLAS products per active expert.
//!
//! The grouped kernels take every expert's weights through a device table of addresses (gate,
//! up, down per expert; 0 where another rank owns the expert), cached per layer by those
//! addresses, so a steady-state step uploads nothing.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, CudaTensor, CudaWeight, WeightData, grid_rows, to_u32};
use super::moe::CudaRouting;
use super::ops::weight_dtype;
use crate::{BackendError, DType, ExpertWeights, Result};

/// Slots (routed tokens) per tile: `MOE_TM` of moe.cu (the SIMT kernels) and `MMA_TM` of
/// moe_mma.cu (the tensor-core ones).
const TM: usize = 8;
const MMA_TM: usize = 64;
/// Threads of the one `moe_plan` block, and the most experts its scan handles (one per thread):
/// `MOE_PLAN_THREADS` and `MOE_MAX_EXPERTS` of moe.cu.
const PLAN_THREADS: u32 = 1024;
const MAX_EXPERTS: usize = 1024;
/// Warps per block of the grouped kernels and output features per warp (`MOE_WARPS`,
/// `MOE_GU_FEATURES`, `MOE_DOWN_FEATURES` of moe.cu).
const WARPS: usize = 8;
const GU_FEATURES: usize = 2;
const DOWN_FEATURES: usize = 4;
/// The most blocks a grid may have along y (a CUDA limit).
const MAX_GRID_Y: usize = 65_535;
/// The grouped kernels run while routed pairs average at most this many per expert (two tiles).
const GROUPED_MAX_AVG_PAIRS: usize = 2 * TM;
/// Expert tables kept before the cache starts over (one per MoE layer is the steady state; the
/// bound only matters for a process that loads many models one after another).
const TABLE_CACHE_MAX: usize = 4096;

/// Whether a step of `tokens` tokens, `top_k` choices each over `num_experts` experts, runs the
/// grouped SIMT kernels (`true`) or, with many tokens per expert, the tensor-core ones (or one
/// cuBLAS product per expert on a GPU without them).
///
/// The grouped kernels are SIMT and read an expert's weights once per tile of [`TM`] tokens: ideal
/// for decode, where an expert sees a few tokens and the step is bound by reading each active
/// expert's weights once, and where one synchronisation plus three cuBLAS calls per expert would
/// dominate. With many tokens per expert they re-read the weights once per tile and leave the
/// tensor cores idle, while cuBLAS reads them about once at tensor-core speed, so one copy of the
/// offsets and the per-expert launches pay for themselves. The line is two tiles per expert on
/// average under uniform routing (Mixtral, 8 experts top-2: up to 64 tokens; 128 experts top-8: up
/// to 256). It is reasoned, not measured: it wants tuning on a GPU.
fn use_grouped(tokens: usize, top_k: usize, num_experts: usize) -> bool {
    tokens * top_k <= GROUPED_MAX_AVG_PAIRS * num_experts
}

/// An upper bound of the tiles of `tm` slots of `pairs` routed pairs over `owned` experts: an
/// expert with `c` pairs has `ceil(c / tm) <= floor(c / tm) + 1` tiles, the floors sum to at most
/// `pairs / tm`, and at most `min(owned, pairs)` experts have any pair.
fn max_tiles(pairs: usize, owned: usize, tm: usize) -> usize {
    pairs / tm + owned.min(pairs)
}

/// A pair of grouped kernels over a plan's tiles (same arguments, different tiling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GroupedKernels {
    gate_up: &'static str,
    down: &'static str,
    /// Slots per tile of the plan they read.
    tile_slots: usize,
    threads: u32,
    /// Output features per block of each.
    gate_up_features: usize,
    down_features: usize,
}

/// The SIMT kernels of moe.cu: a warp per `GU_FEATURES` / `DOWN_FEATURES` output features.
const SIMT: GroupedKernels = GroupedKernels {
    gate_up: "moe_gate_up",
    down: "moe_down",
    tile_slots: TM,
    threads: (32 * WARPS) as u32,
    gate_up_features: WARPS * GU_FEATURES,
    down_features: WARPS * DOWN_FEATURES,
};

/// The tensor-core kernels of moe_mma.cu: 64 slots by 64 features per block, four warps.
const TENSOR_CORES: GroupedKernels = GroupedKernels {
    gate_up: "moe_gate_up_mma",
    down: "moe_down_mma",
    tile_slots: MMA_TM,
    threads: 128,
    gate_up_features: 64,
    down_features: 64,
};

/// How a call runs its experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// [`use_grouped`] and the device decide.
    Auto,
    Grouped,
    TensorCores,
    PerExpert,
}

/// dtype numbers of prelude.cu (`DT_F32`, `DT_F16`, `DT_BF16`).
fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Scalars of `moe_plan`; the same fields in the same order as `PlanArgs` in moe.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct PlanArgs {
    pairs: u32,
    top_k: u32,
    num_experts: u32,
    max_tiles: u32,
    tile_slots: u32,
}

// SAFETY: `repr(C)` with only `u32` fields, matching the C struct field for field; passed by value.
unsafe impl DeviceRepr for PlanArgs {}

/// Scalars of `moe_gate_up` and `moe_down`; the same fields in the same order as `GroupedArgs`
/// in moe.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct GroupedArgs {
    /// Output features.
    n: u32,
    /// Input features (the length of a weight row).
    k: u32,
    dtype: i32,
}

// SAFETY: `repr(C)` with only 4-byte integer fields, matching the C struct field for field; passed
// by value.
unsafe impl DeviceRepr for GroupedArgs {}

/// A layer's experts as the kernels see them, checked on the host.
struct ExpertLayer {
    /// (gate, up, down) device addresses per expert, 0 for an expert owned by another rank.
    addrs: Vec<u64>,
    dtype: DType,
    inter: usize,
    owned: usize,
}

/// One call of the grouped kernels, checked: the step, its plan and the kernels to run.
#[derive(Clone, Copy)]
struct GroupedCall<'a> {
    x: &'a CudaTensor,
    r: &'a CudaRouting,
    plan: &'a Plan,
    table: &'a CudaSlice<u64>,
    layer: &'a ExpertLayer,
    kernels: GroupedKernels,
}

/// The device plan of one call (`moe_plan`), sized for `pairs` routed pairs.
struct Plan {
    /// `[pairs]`: the pair's slot, `u32::MAX` when another rank owns its expert.
    slot_of_pair: CudaSlice<u32>,
    /// `[pairs]` (slots never outnumber pairs): the token and routing weight of each slot.
    token_of_slot: CudaSlice<u32>,
    weight_of_slot: CudaSlice<f32>,
    /// `[experts + 1]`: expert e's slots are `offsets[e] .. offsets[e + 1]`.
    offsets: CudaSlice<u32>,
    /// `[2 * max_tiles]`: (expert, first slot) per tile; `n_tiles[0]` of them are real.
    tiles: CudaSlice<u32>,
    n_tiles: CudaSlice<u32>,
    max_tiles: usize,
}

impl CudaBackend {
    pub(super) fn moe_impl(
        &self,
        x: &CudaTensor,
        r: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        self.moe_path(x, r, experts, Path::Auto)
    }

    /// [`crate::Backend::moe`] through the grouped kernels whatever the step's size (for tests
    /// and benchmarks: the automatic choice sends large steps to cuBLAS).
    pub fn moe_grouped(
        &self,
        x: &CudaTensor,
        r: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        self.moe_path(x, r, experts, Path::Grouped)
    }

    /// [`crate::Backend::moe`] through the tensor-core grouped kernels whatever the step's size
    /// (for tests and benchmarks: the automatic choice sends small steps to the SIMT ones).
    pub fn moe_tensor_cores(
        &self,
        x: &CudaTensor,
        r: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        self.moe_path(x, r, experts, Path::TensorCores)
    }

    /// [`crate::Backend::moe`] through one cuBLAS product per expert whatever the step's size
    /// (for tests and benchmarks: the automatic choice sends small steps to the grouped kernels).
    pub fn moe_per_expert(
        &self,
        x: &CudaTensor,
        r: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        self.moe_path(x, r, experts, Path::PerExpert)
    }

    fn moe_path(
        &self,
        x: &CudaTensor,
        r: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
        path: Path,
    ) -> Result<CudaTensor> {
        const OP: &str = "moe";
        if x.rows != r.tokens {
            return Err(BackendError::shape(
                OP,
                format!("{} rows for routing of {} tokens", x.rows, r.tokens),
            ));
        }
        if experts.len() < r.num_experts {
            return Err(BackendError::invalid(
                OP,
                format!(
                    "routing over {} experts, but the layer has {}",
                    r.num_experts,
                    experts.len()
                ),
            ));
        }
        if experts.len() > MAX_EXPERTS {
            return Err(BackendError::invalid(
                OP,
                format!(
                    "{} experts: the device plan handles at most {MAX_EXPERTS}",
                    experts.len()
                ),
            ));
        }
        let hidden = x.cols;
        let layer = self.expert_layer(experts, hidden)?;
        let mut out = self.tensor(OP, x.rows, hidden)?;
        let pairs = r.tokens * r.top_k;
        if pairs == 0 || hidden == 0 || layer.inter == 0 || layer.owned == 0 {
            return Ok(out);
        }
        let table = self.expert_table(&layer.addrs)?;
        let tensor_cores = super::plan::has_tf32_mma(self.info.compute_capability);
        let switched_on = self
            .tensor_core_moe
            .load(std::sync::atomic::Ordering::Relaxed);
        let path = match path {
            Path::Auto if use_grouped(r.tokens, r.top_k, experts.len()) => Path::Grouped,
            Path::Auto if tensor_cores && switched_on => Path::TensorCores,
            Path::Auto => Path::PerExpert,
            Path::TensorCores if !tensor_cores => {
                return Err(BackendError::Unsupported {
                    op: "moe on tensor cores (needs compute capability 8.0)",
                    backend: "cuda",
                });
            }
            chosen => chosen,
        };
        let kernels = if path == Path::TensorCores {
            TENSOR_CORES
        } else {
            SIMT
        };
        let plan = self.plan(r, &table, (experts.len(), layer.owned), kernels.tile_slots)?;
        if path == Path::PerExpert {
            self.run_per_expert(x, &plan, experts, &mut out)?;
        } else {
            let call = GroupedCall {
                x,
                r,
                plan: &plan,
                table: &table,
                layer: &layer,
                kernels,
            };
            self.run_grouped(&call, &mut out)?;
        }
        Ok(out)
    }

    /// Checks every owned expert's shapes against `hidden` and against each other, and that all
    /// share one dtype (the grouped kernels read one dtype per layer), and collects their
    /// addresses.
    fn expert_layer(
        &self,
        experts: &[Option<ExpertWeights<'_, Self>>],
        hidden: usize,
    ) -> Result<ExpertLayer> {
        const OP: &str = "moe";
        let mut first: Option<(usize, DType, usize)> = None;
        let mut addrs = Vec::with_capacity(3 * experts.len());
        for (i, e) in experts.iter().enumerate() {
            let Some(e) = e else {
                addrs.extend([0; 3]);
                continue;
            };
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
            let dtypes = [e.gate, e.up, e.down].map(weight_dtype);
            let dtype = dtypes[0];
            if dtypes.iter().any(|d| *d != dtype) {
                return Err(BackendError::invalid(
                    OP,
                    format!(
                        "expert {i}: gate, up and down are {dtypes:?}; an expert's weights must \
                         share one dtype"
                    ),
                ));
            }
            match first {
                None => first = Some((i, dtype, inter)),
                Some((j, d, _)) if d != dtype => {
                    return Err(BackendError::invalid(
                        OP,
                        format!(
                            "expert {j} is {d:?} but expert {i} is {dtype:?}; all experts of a \
                             layer must share one dtype"
                        ),
                    ));
                }
                Some((j, _, n)) if n != inter => {
                    return Err(BackendError::shape(
                        OP,
                        format!(
                            "expert {j} has intermediate size {n} but expert {i} {inter}; all \
                             experts of a layer must share one shape"
                        ),
                    ));
                }
                Some(_) => {}
            }
            addrs.extend([e.gate, e.up, e.down].map(|w| self.weight_addr(w)));
        }
        let (dtype, inter) = first.map_or((DType::F32, 0), |(_, d, n)| (d, n));
        Ok(ExpertLayer {
            owned: addrs.chunks(3).filter(|a| a[0] != 0).count(),
            addrs,
            dtype,
            inter,
        })
    }

    /// The device address of a weight's first element (never 0 for a live allocation).
    fn weight_addr(&self, w: &CudaWeight) -> u64 {
        // The guard returned with the address records an event only when cudarc tracks events,
        // which this backend turns off (device.rs): dropping it at once costs nothing.
        match &w.data {
            WeightData::F32(s) => s.device_ptr(&self.stream).0,
            WeightData::Half { bits, .. } => bits.device_ptr(&self.stream).0,
        }
    }

    /// The device copy of `addrs`, uploaded the first time a layer's experts are seen.
    fn expert_table(&self, addrs: &[u64]) -> Result<Arc<CudaSlice<u64>>> {
        let mut cache = self.expert_tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(addrs) {
            return Ok(t.clone());
        }
        if cache.len() >= TABLE_CACHE_MAX {
            cache.clear();
        }
        let table = Arc::new(self.upload("moe (expert table)", addrs)?);
        cache.insert(addrs.to_vec(), table.clone());
        Ok(table)
    }

    /// The device plan of `r` over `(num_experts, owned)` experts, in tiles of `tile_slots`.
    fn plan(
        &self,
        r: &CudaRouting,
        table: &CudaSlice<u64>,
        (num_experts, owned): (usize, usize),
        tile_slots: usize,
    ) -> Result<Plan> {
        const OP: &str = "moe (plan)";
        let pairs = r.tokens * r.top_k;
        let max_tiles = max_tiles(pairs, owned, tile_slots);
        let args = PlanArgs {
            pairs: to_u32(OP, pairs)?,
            top_k: to_u32(OP, r.top_k)?,
            num_experts: to_u32(OP, num_experts)?,
            max_tiles: to_u32(OP, max_tiles)?,
            tile_slots: to_u32(OP, tile_slots)?,
        };
        // With pairs < 2^32, max_tiles < 2^29 + MAX_EXPERTS: within a grid's x limit (2^31 - 1),
        // which the grouped kernels launch with.
        // moe_plan writes every element that is read later: slot_of_pair and offsets in full,
        // the first `slots` of token_of_slot and weight_of_slot, the first n_tiles tiles, and
        // n_tiles (the grouped kernels stop at n_tiles and at each expert's last slot).
        let mut p = Plan {
            slot_of_pair: self.uninit(OP, pairs)?,
            token_of_slot: self.uninit(OP, pairs)?,
            weight_of_slot: self.uninit(OP, pairs)?,
            offsets: self.uninit(OP, num_experts + 1)?,
            tiles: self.uninit(OP, 2 * max_tiles)?,
            n_tiles: self.uninit(OP, 1)?,
            max_tiles,
        };
        let mut b = self.stream.launch_builder(self.func("moe_plan")?);
        b.arg(&mut p.slot_of_pair)
            .arg(&mut p.token_of_slot)
            .arg(&mut p.weight_of_slot)
            .arg(&mut p.offsets)
            .arg(&mut p.tiles)
            .arg(&mut p.n_tiles)
            .arg(&r.ids)
            .arg(&r.weights)
            .arg(table)
            .arg(&args);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (PLAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: moe_plan(u32* slot_of_pair, u32* token_of_slot, float* weight_of_slot,
        // u32* offsets, u32* tiles, u32* n_tiles, const u32* ids, const float* weights,
        // const u64* table, PlanArgs a), one block of PLAN_THREADS threads: ids, weights and
        // slot_of_pair hold `pairs` = tokens*top_k elements (route allocated ids and weights so);
        // token_of_slot and weight_of_slot hold `pairs`, and slots never outnumber pairs; offsets
        // holds num_experts + 1; table holds 3*num_experts addresses (one triple per entry of
        // `experts`); tiles holds 2*max_tiles and the kernel writes at most max_tiles tiles;
        // n_tiles holds 1. num_experts <= MAX_EXPERTS = PLAN_THREADS (checked), as the kernel's
        // shared arrays and its one-expert-per-thread scan require; num_experts >= 1 because
        // owned >= 1.
        unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(p)
    }

    /// Steps 2 and 3 of the module docs: the grouped kernels, then the combine.
    fn run_grouped(&self, call: &GroupedCall<'_>, out: &mut CudaTensor) -> Result<()> {
        const OP: &str = "moe (grouped)";
        let GroupedCall {
            x,
            r,
            plan,
            table,
            layer,
            kernels,
        } = *call;
        let (hidden, inter) = (x.cols, layer.inter);
        let pairs = r.tokens * r.top_k;
        let block = kernels.threads;
        let grid = |n: usize, per_block: usize| -> Result<LaunchConfig> {
            let y = n.div_ceil(per_block);
            if y > MAX_GRID_Y {
                return Err(BackendError::invalid(
                    OP,
                    format!("{n} output features need {y} blocks along y (at most {MAX_GRID_Y})"),
                ));
            }
            Ok(LaunchConfig {
                grid_dim: (to_u32(OP, plan.max_tiles)?, y as u32, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        let (gu_cfg, down_cfg) = (
            grid(inter, kernels.gate_up_features)?,
            grid(hidden, kernels.down_features)?,
        );
        let code = dtype_code(layer.dtype);
        let (n_hidden, n_inter) = (to_u32(OP, hidden)?, to_u32(OP, inter)?);
        // Rows of the owned slots, each written by its tile before it is read; the rest unread.
        let mut h = self.uninit::<f32>(OP, pairs * inter)?;
        let mut y = self.uninit::<f32>(OP, pairs * hidden)?;

        let gu = GroupedArgs {
            n: n_inter,
            k: n_hidden,
            dtype: code,
        };
        let mut b = self.stream.launch_builder(self.func(kernels.gate_up)?);
        b.arg(&mut h)
            .arg(&x.data)
            .arg(&plan.token_of_slot)
            .arg(&plan.offsets)
            .arg(&plan.tiles)
            .arg(&plan.n_tiles)
            .arg(table)
            .arg(&gu);
        // SAFETY: moe_gate_up[_mma](float* h, const float* x, const u32* token_of_slot,
        // const u32* offsets, const u32* tiles, const u32* n_tiles, const u64* table,
        // GroupedArgs a), grid (max_tiles, ceil(inter / gate_up_features)), `threads` threads,
        // the plan's tiles of the kernels' `tile_slots` (the plan was made with them):
        // blocks at or past n_tiles[0] <= max_tiles (the plan's bound) return; a tile's slots lie
        // inside its expert's offsets range, below `pairs`, so h (pairs*inter floats) holds every
        // row written; token_of_slot gives tokens < x.rows (pair / top_k), and x holds
        // x.rows*hidden floats. The tile's expert is owned (the plan only tiles owned experts),
        // so its table entries are the live gate and up weights of `experts`: [inter, hidden]
        // each (checked), all of `layer.dtype` (checked), passed as `dtype`; features past inter
        // read the last row and are not written. The weights outlive the kernel in stream order:
        // cudarc frees device memory asynchronously on the stream.
        unsafe { b.launch(gu_cfg) }.map_err(|e| BackendError::device(OP, e))?;

        let dn = GroupedArgs {
            n: n_hidden,
            k: n_inter,
            dtype: code,
        };
        let mut b = self.stream.launch_builder(self.func(kernels.down)?);
        b.arg(&mut y)
            .arg(&h)
            .arg(&plan.offsets)
            .arg(&plan.tiles)
            .arg(&plan.n_tiles)
            .arg(table)
            .arg(&dn);
        // SAFETY: moe_down[_mma](float* y, const float* h, const u32* offsets, const u32* tiles,
        // const u32* n_tiles, const u64* table, GroupedArgs a), grid (max_tiles,
        // ceil(hidden / down_features)), `threads` threads: as for the gate/up kernel, tiles
        // cover owned experts' slots below `pairs`; y holds pairs*hidden floats and h
        // pairs*inter, every row read written by moe_gate_up before (same stream); the down
        // weight is [hidden, inter] of `layer.dtype` (checked).
        unsafe { b.launch(down_cfg) }.map_err(|e| BackendError::device(OP, e))?;

        let top_k = to_u32(OP, r.top_k)?;
        let mut b = self.stream.launch_builder(self.func("moe_combine")?);
        b.arg(&mut out.data)
            .arg(&y)
            .arg(&plan.slot_of_pair)
            .arg(&r.weights)
            .arg(&top_k)
            .arg(&n_hidden);
        // SAFETY: moe_combine(float* out, const float* y, const u32* slot_of_pair,
        // const float* weights, u32 top_k, u32 cols), one block per token: out holds
        // tokens*hidden floats; slot_of_pair and weights hold tokens*top_k; every slot other
        // than the "not owned" marker is below `pairs` and y holds pairs*hidden floats.
        unsafe { b.launch(grid_rows(r.tokens, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }

    /// Large steps on a GPU without tf32 tensor-core instructions (or when asked): the plan's
    /// offsets come to the host (the one copy), then each active expert
    /// runs as gather → cuBLAS gate and up → SiLU×mul → cuBLAS down → weighted scatter-add, in
    /// expert order (deterministic: one stream, each launch adds distinct rows).
    fn run_per_expert(
        &self,
        x: &CudaTensor,
        plan: &Plan,
        experts: &[Option<ExpertWeights<'_, Self>>],
        out: &mut CudaTensor,
    ) -> Result<()> {
        const OP: &str = "moe (per expert)";
        let pairs = plan.token_of_slot.len();
        let offsets = self.download(OP, &plan.offsets, experts.len() + 1)?;
        // The kernel's output is trusted only as far as it can be checked: bad offsets would
        // otherwise make the slicing below panic.
        if offsets.windows(2).any(|w| w[0] > w[1])
            || offsets.last().is_some_and(|&s| s as usize > pairs)
        {
            return Err(BackendError::device(
                OP,
                format!("moe_plan produced invalid offsets {offsets:?} for {pairs} pairs"),
            ));
        }
        let cols = to_u32(OP, x.cols)?;
        for (e, ex) in experts.iter().enumerate() {
            let Some(ex) = ex else { continue };
            let (start, end) = (offsets[e] as usize, offsets[e + 1] as usize);
            if end == start {
                continue;
            }
            let n = end - start;
            let idx = plan.token_of_slot.slice(start..end);
            let xs = self.gather_dev(x, &idx, n)?;
            let h = self.silu_mul_impl(
                &self.linear_impl(&xs, ex.gate, None, None)?,
                &self.linear_impl(&xs, ex.up, None, None)?,
            )?;
            let y = self.linear_impl(&h, ex.down, None, None)?;
            let w = plan.weight_of_slot.slice(start..end);
            let mut b = self.stream.launch_builder(self.func("scatter_add_rows")?);
            b.arg(&mut out.data)
                .arg(&y.data)
                .arg(&idx)
                .arg(&w)
                .arg(&cols);
            // SAFETY: scatter_add_rows(float* out, const float* y, const u32* rows,
            // const float* w, u32 cols): one block per slot of this expert; y holds n*cols
            // floats, idx and w hold n entries; every row is a token (pair / top_k < x.rows, and
            // out holds x.rows*cols floats), distinct within one expert (a token picks an expert
            // at most once), so no two blocks write the same row.
            unsafe { b.launch(grid_rows(n, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_bound_covers_every_split_of_pairs() {
        // Every way of spreading `pairs` over `owned` experts (small cases, exhaustively for 3
        // experts) has at most max_tiles tiles.
        for pairs in 0..40 {
            for a in 0..=pairs {
                for b in 0..=pairs - a {
                    let c = pairs - a - b;
                    for tm in [TM, MMA_TM, 5] {
                        let tiles: usize = [a, b, c].iter().map(|n: &usize| n.div_ceil(tm)).sum();
                        assert!(tiles <= max_tiles(pairs, 3, tm), "{a} {b} {c} in {tm}");
                    }
                }
            }
        }
    }

    #[test]
    fn decode_steps_run_the_simt_kernels_and_large_prefills_do_not() {
        // Mixtral (8 experts, top-2): decode batches up to 64 tokens stay grouped.
        assert!(use_grouped(1, 2, 8) && use_grouped(64, 2, 8));
        assert!(!use_grouped(65, 2, 8));
        // Qwen3-30B-A3B (128 experts, top-8).
        assert!(use_grouped(256, 8, 128) && !use_grouped(2048, 8, 128));
    }
}

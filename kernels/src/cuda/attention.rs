//! The paged KV cache and paged attention on the GPU.
//!
//! The cache stores keys and values in bf16 with the CPU backend's layout
//! `[block][kv_head][slot][dim]`; every kernel reads positions, slots and block tables from the
//! step's metadata ([`CudaStep`], `step.rs`).

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, CudaTensor, grid_rows, to_u32};
use super::plan;
use super::step::CudaStep;
use crate::{AttentionParams, BackendError, KvSpec, KvValues, Result};

/// Threads per block of the attention kernels (a multiple of 32, as their reductions need).
const ATTN_THREADS: u32 = plan::ATTN_THREADS as u32;

/// One layer's paged K and V cache in device memory (bf16 bit patterns); no V storage when the
/// values are a prefix of the keys ([`KvValues::KeyPrefix`]).
pub struct CudaKv {
    pub(super) spec: KvSpec,
    pub(super) k: CudaSlice<u16>,
    v: Option<CudaSlice<u16>>,
}

impl CudaKv {
    /// Where values are read from: their own storage, or the keys.
    pub(super) fn values(&self) -> &CudaSlice<u16> {
        self.v.as_ref().unwrap_or(&self.k)
    }
}

/// Scalars of the attention kernels; the same fields in the same order as `AttnArgs` in attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct AttnArgs {
    num_heads: u32,
    pub(super) num_kv_heads: u32,
    qk_dim: u32,
    v_dim: u32,
    block_size: u32,
    v_stride: u32,
    window: u32,
    key_lo: u32,
    key_hi: u32,
    head_groups: u32,
    group_heads: u32,
    scale: f32,
}

// SAFETY: `repr(C)` with only 4-byte scalar fields, matching the C struct field for field; passed
// by value.
unsafe impl DeviceRepr for AttnArgs {}

impl AttnArgs {
    /// The scalars for `p` over `spec`'s cache, with each KV head's query heads served by
    /// `head_groups` blocks of at most `group_heads`.
    fn new(
        op: &'static str,
        p: &AttentionParams,
        spec: &KvSpec,
        (head_groups, group_heads): (usize, usize),
    ) -> Result<AttnArgs> {
        Ok(AttnArgs {
            num_heads: to_u32(op, p.num_heads)?,
            num_kv_heads: to_u32(op, p.num_kv_heads)?,
            qk_dim: to_u32(op, p.qk_dim)?,
            v_dim: to_u32(op, p.v_dim)?,
            block_size: to_u32(op, spec.block_size)?,
            v_stride: to_u32(op, spec.v_stride())?,
            window: p.sliding_window.map_or(Ok(0), |w| to_u32(op, w.max(1)))?,
            key_lo: 0,
            key_hi: u32::MAX,
            head_groups: to_u32(op, head_groups)?,
            group_heads: to_u32(op, group_heads)?,
            scale: p.scale,
        })
    }

    /// The same scalars attending only the positions `keys` (a chunk's).
    fn over_keys(self, op: &'static str, keys: &Range<usize>) -> Result<AttnArgs> {
        Ok(AttnArgs {
            key_lo: to_u32(op, keys.start)?,
            key_hi: u32::try_from(keys.end).unwrap_or(u32::MAX),
            ..self
        })
    }
}

impl CudaBackend {
    pub(super) fn alloc_kv_impl(&self, spec: KvSpec) -> Result<CudaKv> {
        const OP: &str = "alloc_kv";
        spec.validate(OP)?;
        let slots = spec.num_blocks * spec.block_size * spec.num_kv_heads;
        let v = match spec.values {
            KvValues::Separate => Some(self.zeros(OP, slots * spec.v_dim)?),
            KvValues::KeyPrefix => None,
        };
        Ok(CudaKv {
            spec,
            k: self.zeros(OP, slots * spec.k_dim)?,
            v,
        })
    }

    /// A cache with separate values whose contents are unspecified: the scratch cache of
    /// attention over rows (`context.rs`), whose kernels read only the slots its rows fill
    /// (each token's positions up to its own), so zeroing it would be a wasted memset.
    pub(super) fn alloc_kv_scratch(&self, spec: KvSpec) -> Result<CudaKv> {
        const OP: &str = "attention_rows";
        spec.validate(OP)?;
        let slots = spec.num_blocks * spec.block_size * spec.num_kv_heads;
        Ok(CudaKv {
            spec: KvSpec {
                values: KvValues::Separate,
                ..spec
            },
            k: self.uninit(OP, slots * spec.k_dim)?,
            v: Some(self.uninit(OP, slots * spec.v_dim)?),
        })
    }

    /// Checks that a step's block tables fit a cache.
    pub(super) fn check_blocks(op: &'static str, spec: &KvSpec, step: &CudaStep) -> Result<()> {
        if step.meta.block_size != spec.block_size {
            return Err(BackendError::invalid(
                op,
                format!(
                    "step block size {} for a cache of block size {}",
                    step.meta.block_size, spec.block_size
                ),
            ));
        }
        step.cache_blocks
            .fetch_min(spec.num_blocks, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = step.max_block
            && b as usize >= spec.num_blocks
        {
            return Err(BackendError::invalid(
                op,
                format!("block {b} beyond a cache of {} blocks", spec.num_blocks),
            ));
        }
        Ok(())
    }

    pub(super) fn write_kv_impl(
        &self,
        cache: &mut CudaKv,
        k: &CudaTensor,
        v: Option<&CudaTensor>,
        step: &CudaStep,
    ) -> Result<()> {
        const OP: &str = "write_kv";
        let spec = cache.spec;
        let n = step.rows;
        spec.check_write(n, (k.rows, k.cols), v.map(|v| (v.rows, v.cols)))?;
        Self::check_blocks(OP, &spec, step)?;
        self.write_kv_rows(cache, (k, v), &step.slots(), n)
    }

    /// Writes `n` rows of keys (and values) into the slots `slots` lists: the step's own rows,
    /// or context rows into a scratch cache. The caller checked the shapes and that every slot's
    /// block is inside the cache.
    pub(super) fn write_kv_rows(
        &self,
        cache: &mut CudaKv,
        (k, v): (&CudaTensor, Option<&CudaTensor>),
        slots: &CudaView<'_, u32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "write_kv";
        let spec = cache.spec;
        if n == 0 {
            return Ok(());
        }
        // Without value storage the kernel writes no values (vd = 0) and its value pointers
        // are the keys', never dereferenced.
        let vd = if v.is_some() { spec.v_dim } else { 0 };
        let dims = [spec.num_kv_heads, spec.k_dim, vd, spec.block_size];
        let [heads, kd, vd, bs] = dims.map(|d| d as u32);
        to_u32(OP, spec.num_kv_heads * spec.k_dim.max(spec.v_dim))?;
        let CudaKv { k: kc, v: vc, .. } = cache;
        let mut b = self.stream.launch_builder(self.func(OP)?);
        match vc {
            Some(vc) => b.arg(kc).arg(vc),
            None => b.arg(kc).arg(&0u64),
        };
        b.arg(&k.data).arg(&v.unwrap_or(k).data);
        b.arg(slots).arg(&heads).arg(&kd).arg(&vd).arg(&bs);
        // SAFETY: write_kv(u16* kc, u16* vc, const float* k, const float* v, const u32* slots,
        // u32 kv_heads, u32 kd, u32 vd, u32 block_size): one block per token; k holds
        // n*heads*kd floats and v, when the cache stores values, n*heads*vd (check_write);
        // otherwise vd = 0 and vc (null) and v are never read; slots holds n entries whose blocks
        // are all < num_blocks (check_blocks), so every write lands inside the cache.
        unsafe { b.launch(super::device::grid_rows(n, 128)) }
            .map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }

    pub(super) fn attention_impl(
        &self,
        q: &CudaTensor,
        cache: &CudaKv,
        step: &CudaStep,
        p: &AttentionParams,
    ) -> Result<CudaTensor> {
        const OP: &str = "attention";
        let spec = &cache.spec;
        if spec.k_dim != p.qk_dim || spec.v_dim != p.v_dim || spec.num_kv_heads != p.num_kv_heads {
            return Err(BackendError::shape(
                OP,
                format!("cache {spec:?} does not fit {p:?}"),
            ));
        }
        Self::check_blocks(OP, spec, step)?;
        let over = Attended {
            views: StepViews::of(step),
            rows: step.rows,
            max_span: step.max_span(p.sliding_window),
            tiles: step.tiles(),
            keys: 0..usize::MAX,
            lse: false,
        };
        Ok(self.attend(q, cache, over, p)?.0)
    }

    /// Attention of `q`'s rows over `cache` through the tables in `over`, whose blocks the
    /// caller checked against the cache (which fits `p`): the outputs, and each row's
    /// log-sum-exp `[rows, heads]` when `over.lse` asks for it.
    pub(super) fn attend(
        &self,
        q: &CudaTensor,
        cache: &CudaKv,
        over: Attended<'_>,
        p: &AttentionParams,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        const OP: &str = "attention";
        let spec = &cache.spec;
        p.check_heads(OP)?;
        let n = over.rows;
        if (q.rows, q.cols) != (n, p.num_heads * p.qk_dim) {
            return Err(BackendError::shape(
                OP,
                format!(
                    "q is {}x{} for {n} tokens × {}",
                    q.rows,
                    q.cols,
                    p.num_heads * p.qk_dim
                ),
            ));
        }
        if p.v_dim > plan::ATTN_MAX_V_DIM {
            return Err(BackendError::Unsupported {
                op: "attention with v_dim over 512",
                backend: "cuda",
            });
        }
        let Some(grouping) =
            plan::attention_grouping(p.num_heads / p.num_kv_heads, p.qk_dim, p.v_dim)
        else {
            return Err(BackendError::Unsupported {
                op: "attention with qk_dim too large for one head's shared memory",
                backend: "cuda",
            });
        };
        let mut out = self.output(OP, n, p.num_heads * p.v_dim)?;
        let mut lse = match over.lse {
            true => Some(self.output(OP, n, p.num_heads)?),
            false => None,
        };
        if n == 0 || p.num_heads == 0 {
            return Ok((out, lse));
        }
        let tensor_cores = self
            .tensor_core_prefill
            .load(std::sync::atomic::Ordering::Relaxed);
        let tiled = tensor_cores.then(|| {
            plan::prefill_plan(plan::PrefillShape {
                group: p.num_heads / p.num_kv_heads,
                qk_dim: p.qk_dim,
                v_dim: p.v_dim,
                v_stride: spec.v_stride(),
                compute_capability: self.info.compute_capability,
                tokens: n,
                tiles: over.tiles.1,
            })
        });
        if let Some(tiled) = tiled.flatten() {
            let args = AttnArgs::new(OP, p, spec, (tiled.head_blocks, tiled.heads_per_block))?
                .over_keys(OP, &over.keys)?;
            let launch = super::prefill::PrefillLaunch {
                q,
                cache,
                over: &over,
                args,
                plan: tiled,
            };
            self.prefill_attention((&mut out, lse.as_mut()), &launch)?;
            return Ok((out, lse));
        }
        let grouping_blocks = (grouping.head_groups, grouping.group_heads);
        let args = AttnArgs::new(OP, p, spec, grouping_blocks)?.over_keys(OP, &over.keys)?;
        let max_span = over.max_span;
        let head_blocks = p.num_kv_heads * grouping.head_groups;
        let splits = plan::attention_splits(n * head_blocks, max_span, self.info.multiprocessors);
        let launch = AttnLaunch {
            q,
            cache,
            views: &over.views,
            args,
            kernel: grouping.kernel,
            tokens: to_u32(OP, n)?,
            head_blocks: to_u32(OP, head_blocks)?,
            smem: to_u32(OP, grouping.shared_bytes)?,
        };
        if splits > 1 {
            self.attention_split((&mut out, lse.as_mut()), &launch, splits)?;
            return Ok((out, lse));
        }
        let cfg = LaunchConfig {
            grid_dim: (launch.tokens, launch.head_blocks, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: launch.smem,
        };
        let mut b = self
            .stream
            .launch_builder(self.func(grouping.kernel.names().0)?);
        b.arg(&mut out.data);
        push_lse(&mut b, lse.as_mut());
        launch.push_inputs(&mut b);
        // SAFETY: paged_attention[_wide](float* out, float* lse, const float* q, const u16* kc,
        // const u16* vc, const u32* tok_pos, const u32* tok_table, const u32* tables,
        // AttnArgs a): grid (tokens, kv_heads * head_groups), each block serving at most
        // group_heads query heads of its KV head (at most the kernel's HEADS); q holds
        // tokens*heads*qk_dim floats and out tokens*heads*v_dim (checked); each token reads
        // positions <= its own, whose blocks were checked by prepare_step (table long enough) and
        // check_blocks (< num_blocks), or for a scratch cache laid out by the step's
        // ContextLayout, whose tables cover each context with blocks < its size; value rows are
        // v_stride apart in vc (the keys when the cache has no values, v_dim <= qk_dim by
        // KvSpec::validate); dynamic shared memory is the
        // `AttnShared` size for group_heads (plan::attention_grouping); v_dim <= DIMS * blockDim
        // for the kernel plan::AttnKernel::for_v_dim chose; lse is null or holds
        // tokens*heads floats, one per (token, head) row.
        unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(OP, e))?;
        Ok((out, lse))
    }

    /// Split-K attention: `splits` partial runs per (token, head) row, then their merge.
    fn attention_split(
        &self,
        (out, lse): (&mut CudaTensor, Option<&mut CudaTensor>),
        l: &AttnLaunch<'_>,
        splits: usize,
    ) -> Result<()> {
        const OP: &str = "attention (split)";
        let (heads, v_dim) = (l.args.num_heads as usize, l.args.v_dim);
        let rows = l.tokens as usize * heads;
        to_u32(OP, rows * splits)?;
        // Every split of every row writes its part, empty ones included.
        let mut part_acc = self.uninit::<f32>(OP, rows * splits * v_dim as usize)?;
        let mut part_ml = self.uninit::<f32>(OP, rows * splits * 2)?;
        let splits32 = to_u32(OP, splits)?;
        let cfg = LaunchConfig {
            grid_dim: (l.tokens, l.head_blocks, splits32),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: l.smem,
        };
        let mut b = self.stream.launch_builder(self.func(l.kernel.names().1)?);
        b.arg(&mut part_acc).arg(&mut part_ml);
        l.push_inputs(&mut b);
        // SAFETY: paged_attention_split[_wide](float* part_acc, float* part_ml, then the inputs
        // of paged_attention[_wide]): grid (tokens, kv_heads * head_groups, splits); part_acc holds
        // rows*splits*v_dim floats
        // and part_ml rows*splits*2, the kernel's indexing for row r = t*heads + h and split s;
        // the inputs were checked as for paged_attention (attention_impl); each split reads a
        // subrange of the positions the token may attend.
        unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(OP, e))?;
        let mut b = self.stream.launch_builder(self.func("attention_combine")?);
        b.arg(&mut out.data);
        push_lse(&mut b, lse);
        b.arg(&part_acc).arg(&part_ml).arg(&splits32).arg(&v_dim);
        // SAFETY: attention_combine(float* out, float* lse, const float* part_acc,
        // const float* part_ml, u32 splits, u32 v_dim): one block per row; out holds rows*v_dim
        // floats and lse, unless null, rows (allocated by attend), part_acc and part_ml as
        // written above.
        unsafe { b.launch(grid_rows(rows, ATTN_THREADS)) }
            .map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }
}

/// The inputs shared by the attention kernels, checked by `attention_impl`.
struct AttnLaunch<'a> {
    q: &'a CudaTensor,
    cache: &'a CudaKv,
    views: &'a StepViews<'a>,
    args: AttnArgs,
    kernel: plan::AttnKernel,
    tokens: u32,
    /// Blocks per token: KV heads × head groups.
    head_blocks: u32,
    /// Dynamic shared memory of one block.
    smem: u32,
}

/// The step's arrays the attention kernels read: the step's own, or a scratch cache's tables.
pub(super) struct StepViews<'a> {
    pub(super) tok_pos: CudaView<'a, u32>,
    pub(super) tok_table: CudaView<'a, u32>,
    pub(super) tables: CudaView<'a, u32>,
}

/// What [`CudaBackend::attend`] reads through: the tables, the query rows, the longest span
/// a row attends (which sizes split-K), the step's tiles for the tiled prompt kernel (the
/// packed pairs and their count), the positions attended, and whether the rows' log-sum-exps
/// are wanted too.
pub(super) struct Attended<'a> {
    pub(super) views: StepViews<'a>,
    pub(super) rows: usize,
    pub(super) max_span: usize,
    pub(super) tiles: (CudaView<'a, u32>, usize),
    pub(super) keys: Range<usize>,
    pub(super) lse: bool,
}

/// Pushes a kernel's `float* lse` parameter: the tensor, or null when none is wanted.
pub(super) fn push_lse<'b>(b: &mut LaunchArgs<'b>, lse: Option<&'b mut CudaTensor>) {
    match lse {
        Some(l) => b.arg(&mut l.data),
        None => b.arg(&0u64),
    };
}

impl<'a> StepViews<'a> {
    fn of(step: &'a CudaStep) -> Self {
        StepViews {
            tok_pos: step.tok_pos(),
            tok_table: step.tok_table(),
            tables: step.tables(),
        }
    }
}

impl AttnLaunch<'_> {
    /// q, kc, vc, tok_pos, tok_table, tables, args: the parameters after the outputs.
    fn push_inputs<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        b.arg(&self.q.data)
            .arg(&self.cache.k)
            .arg(self.cache.values())
            .arg(&self.views.tok_pos)
            .arg(&self.views.tok_table)
            .arg(&self.views.tables)
            .arg(&self.args);
    }
}

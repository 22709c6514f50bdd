//! Per-step metadata on the device, the paged KV cache and paged attention on the GPU.
//!
//! [`CudaStep`] is built once per forward step: RoPE angles per new token (computed on the host by
//! the CPU backend's own function, so both backends rotate by bit-identical angles), each token's
//! position and cache slot, and the sequences' block tables, packed into one buffer and uploaded
//! with one copy, then read by every layer. The cache stores keys and values in bf16 with the CPU backend's layout
//! `[block][kv_head][slot][dim]`.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, CudaTensor, grid_rows, to_u32};
use super::plan;
use crate::{
    AttentionParams, BackendError, KvSpec, KvValues, Result, RopeLayout, RopeTable, StepMeta,
};

/// Threads per block of the attention kernels (a multiple of 32, as their reductions need).
const ATTN_THREADS: u32 = plan::ATTN_THREADS as u32;

/// A forward step's metadata, resident on the device.
pub struct CudaStep {
    pub(super) meta: StepMeta,
    /// Rotary pairs per head (`rot_dim / 2`).
    pub(super) half: usize,
    pub(super) layout: RopeLayout,
    /// Every array below, one after the other (f32 arrays as their bit patterns).
    packed: CudaSlice<u32>,
    /// `[tokens, half]` f32 each, already multiplied by the attention scaling.
    cos: Range<usize>,
    sin: Range<usize>,
    /// Position of each new token.
    tok_pos: Range<usize>,
    /// Offset in `tables` of each new token's block table.
    tok_table: Range<usize>,
    /// Every sequence's block table, concatenated.
    tables: Range<usize>,
    /// `block * block_size + slot` where each new token's key and value go.
    slots: Range<usize>,
    /// The largest block any sequence uses for its context (checked against a cache's size).
    max_block: Option<u32>,
}

impl CudaStep {
    fn part(&self, r: &Range<usize>) -> CudaView<'_, u32> {
        self.packed.slice(r.clone())
    }

    /// The cosines, as f32 bit patterns: kernels declare them `const float*`.
    pub(super) fn cos(&self) -> CudaView<'_, u32> {
        self.part(&self.cos)
    }

    /// The sines, as f32 bit patterns (see [`CudaStep::cos`]).
    pub(super) fn sin(&self) -> CudaView<'_, u32> {
        self.part(&self.sin)
    }
}

/// Appends `part` to `packed` and returns where it went.
fn pack(packed: &mut Vec<u32>, part: impl IntoIterator<Item = u32>) -> Range<usize> {
    let start = packed.len();
    packed.extend(part);
    start..packed.len()
}

/// One layer's paged K and V cache in device memory (bf16 bit patterns); no V storage when the
/// values are a prefix of the keys ([`KvValues::KeyPrefix`]).
pub struct CudaKv {
    spec: KvSpec,
    k: CudaSlice<u16>,
    v: Option<CudaSlice<u16>>,
}

impl CudaKv {
    /// Where values are read from: their own storage, or the keys.
    fn values(&self) -> &CudaSlice<u16> {
        self.v.as_ref().unwrap_or(&self.k)
    }
}

/// Scalars of the attention kernels; the same fields in the same order as `AttnArgs` in attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnArgs {
    num_heads: u32,
    num_kv_heads: u32,
    qk_dim: u32,
    v_dim: u32,
    block_size: u32,
    v_stride: u32,
    window: u32,
    head_groups: u32,
    group_heads: u32,
    scale: f32,
}

// SAFETY: `repr(C)` with only 4-byte scalar fields, matching the C struct field for field; passed
// by value.
unsafe impl DeviceRepr for AttnArgs {}

impl CudaBackend {
    pub(super) fn prepare_step_impl(&self, meta: &StepMeta, rope: &RopeTable) -> Result<CudaStep> {
        const OP: &str = "prepare_step";
        if meta.block_size == 0 {
            return Err(BackendError::invalid(OP, "block size 0"));
        }
        let bs = meta.block_size;
        let mut next = 0;
        let (mut tok_table, mut tables, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let mut max_block = None;
        for s in &meta.seqs {
            if s.token_start != next || s.num_tokens == 0 || s.num_tokens > s.context_len {
                return Err(BackendError::invalid(
                    OP,
                    format!("inconsistent sequence {s:?}"),
                ));
            }
            if s.block_table.len() * bs < s.context_len {
                return Err(BackendError::invalid(
                    OP,
                    format!(
                        "{} blocks cannot hold {} positions",
                        s.block_table.len(),
                        s.context_len
                    ),
                ));
            }
            let used = &s.block_table[..s.context_len.div_ceil(bs)];
            max_block = max_block.max(used.iter().copied().max());
            let offset = to_u32(OP, tables.len())?;
            tables.extend_from_slice(&s.block_table);
            for pos in s.context_len - s.num_tokens..s.context_len {
                tok_table.push(offset);
                slots.push(to_u32(
                    OP,
                    s.block_table[pos / bs] as usize * bs + pos % bs,
                )?);
            }
            next += s.num_tokens;
        }
        let positions = meta.positions();
        let (cos, sin) =
            crate::cpu::ops::rope_angles(&positions, &rope.inv_freq, rope.attention_scaling);
        let mut packed = Vec::new();
        let cos = pack(&mut packed, cos.iter().map(|v| v.to_bits()));
        let sin = pack(&mut packed, sin.iter().map(|v| v.to_bits()));
        let tok_pos = pack(&mut packed, positions);
        let tok_table = pack(&mut packed, tok_table);
        let tables = pack(&mut packed, tables);
        let slots = pack(&mut packed, slots);
        Ok(CudaStep {
            meta: meta.clone(),
            half: rope.inv_freq.len(),
            layout: rope.layout,
            packed: self.upload(OP, &packed)?,
            cos,
            sin,
            tok_pos,
            tok_table,
            tables,
            slots,
            max_block,
        })
    }

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

    /// Checks that a step's block tables fit a cache.
    fn check_blocks(op: &'static str, spec: &KvSpec, step: &CudaStep) -> Result<()> {
        if step.meta.block_size != spec.block_size {
            return Err(BackendError::invalid(
                op,
                format!(
                    "step block size {} for a cache of block size {}",
                    step.meta.block_size, spec.block_size
                ),
            ));
        }
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
        let n = step.meta.num_tokens();
        spec.check_write(n, (k.rows, k.cols), v.map(|v| (v.rows, v.cols)))?;
        Self::check_blocks(OP, &spec, step)?;
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
        let slots = step.part(&step.slots);
        b.arg(&slots).arg(&heads).arg(&kd).arg(&vd).arg(&bs);
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
        if p.num_kv_heads == 0 || !p.num_heads.is_multiple_of(p.num_kv_heads) {
            return Err(BackendError::shape(
                OP,
                format!(
                    "{} query heads over {} kv heads",
                    p.num_heads, p.num_kv_heads
                ),
            ));
        }
        let n = step.meta.num_tokens();
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
        Self::check_blocks(OP, spec, step)?;
        let mut out = self.output(OP, n, p.num_heads * p.v_dim)?;
        if n == 0 || p.num_heads == 0 {
            return Ok(out);
        }
        let args = AttnArgs {
            num_heads: to_u32(OP, p.num_heads)?,
            num_kv_heads: to_u32(OP, p.num_kv_heads)?,
            qk_dim: to_u32(OP, p.qk_dim)?,
            v_dim: to_u32(OP, p.v_dim)?,
            block_size: to_u32(OP, spec.block_size)?,
            v_stride: to_u32(OP, spec.v_stride())?,
            window: p.sliding_window.map_or(Ok(0), |w| to_u32(OP, w.max(1)))?,
            head_groups: to_u32(OP, grouping.head_groups)?,
            group_heads: to_u32(OP, grouping.group_heads)?,
            scale: p.scale,
        };
        let max_span = step
            .meta
            .seqs
            .iter()
            .map(|s| {
                p.sliding_window
                    .map_or(s.context_len, |w| s.context_len.min(w.max(1)))
            })
            .max()
            .unwrap_or(0);
        let head_blocks = p.num_kv_heads * grouping.head_groups;
        let splits = plan::attention_splits(n * head_blocks, max_span, self.info.multiprocessors);
        let launch = AttnLaunch {
            q,
            cache,
            step,
            args,
            kernel: grouping.kernel,
            tokens: to_u32(OP, n)?,
            head_blocks: to_u32(OP, head_blocks)?,
            smem: to_u32(OP, grouping.shared_bytes)?,
        };
        if splits > 1 {
            self.attention_split(&mut out, &launch, splits)?;
            return Ok(out);
        }
        let cfg = LaunchConfig {
            grid_dim: (launch.tokens, launch.head_blocks, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: launch.smem,
        };
        let views = StepViews::of(step);
        let mut b = self
            .stream
            .launch_builder(self.func(grouping.kernel.names().0)?);
        b.arg(&mut out.data);
        launch.push_inputs(&mut b, &views);
        // SAFETY: paged_attention[_wide](float* out, const float* q, const u16* kc,
        // const u16* vc, const u32* tok_pos, const u32* tok_table, const u32* tables,
        // AttnArgs a): grid (tokens, kv_heads * head_groups), each block serving at most
        // group_heads query heads of its KV head (at most the kernel's HEADS); q holds
        // tokens*heads*qk_dim floats and out tokens*heads*v_dim (checked); each token reads
        // positions <= its own, whose blocks were checked by prepare_step (table long enough) and
        // check_blocks (< num_blocks); value rows are v_stride apart in vc (the keys when the
        // cache has no values, v_dim <= qk_dim by KvSpec::validate); dynamic shared memory is the
        // `AttnShared` size for group_heads (plan::attention_grouping); v_dim <= DIMS * blockDim
        // for the kernel plan::AttnKernel::for_v_dim chose.
        unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    /// Split-K attention: `splits` partial runs per (token, head) row, then their merge.
    fn attention_split(
        &self,
        out: &mut CudaTensor,
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
        let views = StepViews::of(l.step);
        let mut b = self.stream.launch_builder(self.func(l.kernel.names().1)?);
        b.arg(&mut part_acc).arg(&mut part_ml);
        l.push_inputs(&mut b, &views);
        // SAFETY: paged_attention_split[_wide](float* part_acc, float* part_ml, then the inputs
        // of paged_attention[_wide]): grid (tokens, kv_heads * head_groups, splits); part_acc holds
        // rows*splits*v_dim floats
        // and part_ml rows*splits*2, the kernel's indexing for row r = t*heads + h and split s;
        // the inputs were checked as for paged_attention (attention_impl); each split reads a
        // subrange of the positions the token may attend.
        unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(OP, e))?;
        let mut b = self.stream.launch_builder(self.func("attention_combine")?);
        b.arg(&mut out.data)
            .arg(&part_acc)
            .arg(&part_ml)
            .arg(&splits32)
            .arg(&v_dim);
        // SAFETY: attention_combine(float* out, const float* part_acc, const float* part_ml,
        // u32 splits, u32 v_dim): one block per row; out holds rows*v_dim floats (allocated by
        // attention_impl), part_acc and part_ml as written above.
        unsafe { b.launch(grid_rows(rows, ATTN_THREADS)) }
            .map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }
}

/// The inputs shared by the attention kernels, checked by `attention_impl`.
struct AttnLaunch<'a> {
    q: &'a CudaTensor,
    cache: &'a CudaKv,
    step: &'a CudaStep,
    args: AttnArgs,
    kernel: plan::AttnKernel,
    tokens: u32,
    /// Blocks per token: KV heads × head groups.
    head_blocks: u32,
    /// Dynamic shared memory of one block.
    smem: u32,
}

/// The step's arrays the attention kernels read.
struct StepViews<'a> {
    tok_pos: CudaView<'a, u32>,
    tok_table: CudaView<'a, u32>,
    tables: CudaView<'a, u32>,
}

impl<'a> StepViews<'a> {
    fn of(step: &'a CudaStep) -> Self {
        StepViews {
            tok_pos: step.part(&step.tok_pos),
            tok_table: step.part(&step.tok_table),
            tables: step.part(&step.tables),
        }
    }
}

impl AttnLaunch<'_> {
    /// q, kc, vc, tok_pos, tok_table, tables, args: the parameters after the outputs.
    fn push_inputs<'b>(&'b self, b: &mut LaunchArgs<'b>, views: &'b StepViews<'b>) {
        b.arg(&self.q.data)
            .arg(&self.cache.k)
            .arg(self.cache.values())
            .arg(&views.tok_pos)
            .arg(&views.tok_table)
            .arg(&views.tables)
            .arg(&self.args);
    }
}

//! The launch of the tiled prompt attention (prefill.cu): tensor-core attention for steps whose
//! sequences bring many tokens each, chosen by [`plan::prefill_plan`] inside
//! [`CudaBackend::attend`], which checked the inputs; decode steps and graphs keep the paged
//! kernels of attention.cu.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::attention::{Attended, AttnArgs, CudaKv};
use super::device::{CudaBackend, CudaTensor, to_u32};
use super::plan;
use crate::{BackendError, Result};

/// A checked tiled attention: the queries, the cache, the tables and tiles, the kernel's scalars
/// (`head_groups` = the plan's blocks per KV head, `group_heads` = its heads per block).
pub(super) struct PrefillLaunch<'a> {
    pub(super) q: &'a CudaTensor,
    pub(super) cache: &'a CudaKv,
    pub(super) over: &'a Attended<'a>,
    pub(super) args: AttnArgs,
    pub(super) plan: plan::PrefillPlan,
}

impl CudaBackend {
    pub(super) fn prefill_attention(
        &self,
        (out, lse): (&mut CudaTensor, Option<&mut CudaTensor>),
        l: &PrefillLaunch<'_>,
    ) -> Result<()> {
        const OP: &str = "attention (tiled prompt)";
        let (tiles, num_tiles) = (&l.over.tiles.0, l.over.tiles.1);
        let kv_heads = l.args.num_kv_heads as usize;
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(OP, num_tiles * l.plan.heads_per_block)?,
                to_u32(OP, kv_heads * l.plan.head_blocks)?,
                1,
            ),
            block_dim: (plan::PREFILL_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let views = &l.over.views;
        let mut b = self.stream.launch_builder(self.func(l.plan.kernel.name())?);
        b.arg(&mut out.data);
        super::attention::push_lse(&mut b, lse);
        b.arg(&l.q.data)
            .arg(&l.cache.k)
            .arg(l.cache.values())
            .arg(&views.tok_pos)
            .arg(&views.tok_table)
            .arg(&views.tables)
            .arg(tiles)
            .arg(&l.args);
        // SAFETY: prefill_attention[_wide](float* out, float* lse, const float* q, const u16* kc,
        // const u16* vc, const u32* tok_pos, const u32* tok_table, const u32* tables,
        // const u32* tiles, AttnArgs a): grid (tiles * heads_per_block, kv_heads * head_blocks),
        // 128 threads, static shared memory only (30 KiB at most). `tiles` holds num_tiles
        // (first, count) pairs covering the step's rows, each within one sequence (cuda/step.rs),
        // so every token index is < the rows q (rows*heads*qk_dim floats) and out
        // (rows*heads*v_dim) hold (checked by `attend`), and lse, unless null, rows*heads; each
        // token reads positions <= its own
        // through its sequence's table, whose blocks were checked as for the paged kernels;
        // qk_dim, v_dim and v_stride are multiples of 8 and within the instantiation's widths
        // (plan::prefill_plan), so its 16-byte loads are aligned and its registers hold a warp's
        // queries and outputs; the device is sm_80 or later, as the tensor-core instructions need.
        unsafe { b.launch(cfg) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }
}

//! Context rows on the GPU ([`crate::ContextLayout`]): the step's cached contexts read out as
//! rows, chunk by chunk, attention over keys and values given as rows, and the merge of the
//! chunks' parts.
//!
//! `prepare_context` uploads every chunk's layout once per step, all in one copy: each context
//! row's slot in the cache and in the dense scratch cache, the dense block tables, and each
//! token's offset into them. Attention over rows then writes the rows into a scratch cache with
//! `write_kv` and runs the attention kernels over it, limited to the chunk's positions and
//! writing each row's log-sum-exp beside its output, so keys and values are rounded to bf16 as a
//! cache's are and the kernels are the ones the rest of attention already exercises. The scratch
//! cache is not zeroed: every slot a kernel reads is one a row was written to.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

use super::attention::{Attended, StepViews};
use super::device::{CudaBackend, CudaTensor, grid_rows, to_u32};
use super::step::{CudaStep, push};
use crate::context::{chunk_of, not_prepared};
use crate::{
    AttentionParams, AttentionPart, BackendError, ContextLayout, KvRows, KvSpec, KvValues, Result,
};

/// A step's context chunks, their layouts packed on the device one after the other.
pub struct CudaContext {
    packed: CudaSlice<u32>,
    chunks: Vec<CudaChunk>,
}

/// One chunk's layout on the host and where its arrays are in the packed copy.
struct CudaChunk {
    layout: ContextLayout,
    cache_slots: Range<usize>,
    dense_slots: Range<usize>,
    dense_tok_table: Range<usize>,
    dense_tables: Range<usize>,
}

impl CudaContext {
    /// How many chunks the step's contexts were cut into.
    pub(super) fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

/// A chunk with the packed copy its arrays are in.
struct Chunk<'a> {
    packed: &'a CudaSlice<u32>,
    layout: &'a ContextLayout,
    parts: &'a CudaChunk,
}

impl Chunk<'_> {
    fn part(&self, r: &Range<usize>) -> CudaView<'_, u32> {
        self.packed.slice(r.clone())
    }
}

impl CudaStep {
    fn context(&self, op: &'static str, chunk: usize) -> Result<Chunk<'_>> {
        let c = self.context.as_ref().ok_or_else(|| not_prepared(op))?;
        let parts = chunk_of(op, &c.chunks, chunk)?;
        Ok(Chunk {
            packed: &c.packed,
            layout: &parts.layout,
            parts,
        })
    }
}

impl CudaBackend {
    pub(super) fn prepare_context_impl(
        &self,
        step: &mut CudaStep,
        chunk_positions: Option<usize>,
    ) -> Result<()> {
        const OP: &str = "prepare_context";
        if step.rows != step.meta.num_tokens() {
            return Err(BackendError::invalid(
                OP,
                "a graph's padded step has no context rows",
            ));
        }
        let mut data = Vec::new();
        let chunks = step
            .meta
            .context_chunks(OP, chunk_positions)?
            .into_iter()
            .map(|layout| pack_chunk(&mut data, layout, step.rows))
            .collect::<Result<_>>()?;
        step.context = Some(CudaContext {
            packed: self.upload(OP, &data)?,
            chunks,
        });
        Ok(())
    }

    pub(super) fn gather_context_impl(
        &self,
        cache: &super::attention::CudaKv,
        step: &CudaStep,
        chunk: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "gather_context";
        let ctx = step.context(OP, chunk)?;
        let spec = cache.spec;
        Self::check_blocks(OP, &spec, step)?;
        let rows = ctx.layout.rows;
        let cols = spec.num_kv_heads * spec.k_dim;
        let mut out = self.output(OP, rows, cols)?;
        if rows == 0 || cols == 0 {
            return Ok(out);
        }
        let dims = [spec.num_kv_heads, spec.k_dim, spec.block_size];
        let [heads, kd, bs] = dims.map(|d| d as u32);
        to_u32(OP, cols)?;
        let slots = ctx.part(&ctx.parts.cache_slots);
        let mut b = self.stream.launch_builder(self.func("gather_kv_rows")?);
        b.arg(&mut out.data).arg(&cache.k).arg(&slots);
        b.arg(&heads).arg(&kd).arg(&bs);
        // SAFETY: gather_kv_rows(float* out, const u16* kc, const u32* slots, u32 kv_heads,
        // u32 kd, u32 block_size): one block per row; slots holds `rows` entries, each a slot of
        // a block the step's tables list (prepare_step checked them against the contexts, and
        // every block is < num_blocks, checked above), so every read is inside the cache; out
        // holds rows*kv_heads*kd floats.
        unsafe { b.launch(grid_rows(rows, 128)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn attention_rows_impl(
        &self,
        q: &CudaTensor,
        kv: KvRows<'_, Self>,
        step: &CudaStep,
        p: &AttentionParams,
    ) -> Result<AttentionPart<CudaTensor>> {
        const OP: &str = "attention_rows";
        let ctx = step.context(OP, kv.chunk)?;
        crate::check_attention_rows(
            (q.rows, q.cols),
            ((kv.k.rows, kv.k.cols), (kv.v.rows, kv.v.cols)),
            (step.rows, ctx.layout.rows),
            p,
        )?;
        let mut dense = self.alloc_kv_scratch(KvSpec {
            num_blocks: ctx.layout.dense_blocks,
            block_size: ctx.layout.dense.block_size,
            num_kv_heads: p.num_kv_heads,
            k_dim: p.qk_dim,
            v_dim: p.v_dim,
            values: KvValues::Separate,
        })?;
        let slots = ctx.part(&ctx.parts.dense_slots);
        self.write_kv_rows(&mut dense, (kv.k, Some(kv.v)), &slots, ctx.layout.rows)?;
        let keys = ctx.layout.keys.clone();
        let over = Attended {
            views: StepViews {
                tok_pos: step.tok_pos(),
                tok_table: ctx.part(&ctx.parts.dense_tok_table),
                tables: ctx.part(&ctx.parts.dense_tables),
            },
            rows: step.rows,
            max_span: step.meta.max_span(p.sliding_window).min(keys.len()),
            tiles: step.tiles(),
            keys,
            lse: true,
        };
        let (out, lse) = self.attend(q, &dense, over, p)?;
        let lse = lse.ok_or_else(|| BackendError::invalid(OP, "attention gave no log-sum-exps"))?;
        Ok(AttentionPart { out, lse })
    }

    pub(super) fn merge_attention_impl(
        &self,
        acc: &mut AttentionPart<CudaTensor>,
        part: &AttentionPart<CudaTensor>,
    ) -> Result<()> {
        const OP: &str = "merge_attention";
        let v_dim = crate::check_merge(self, acc, part)?;
        let rows = acc.lse.rows * acc.lse.cols;
        if rows == 0 || v_dim == 0 {
            return Ok(());
        }
        to_u32(OP, rows * v_dim)?;
        let v_dim = v_dim as u32;
        let AttentionPart { out, lse } = acc;
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data).arg(&mut lse.data);
        b.arg(&part.out.data).arg(&part.lse.data).arg(&v_dim);
        // SAFETY: merge_attention(float* out, float* lse, const float* part,
        // const float* part_lse, u32 v_dim): one block per (token, head) row; both parts hold
        // rows*v_dim output floats and rows log-sum-exps (check_merge: equal shapes, one
        // log-sum-exp per row and head), and rows*v_dim fits u32 indexing (checked).
        unsafe { b.launch(grid_rows(rows, 128)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }
}

/// Appends one chunk's arrays to the step's packed copy.
fn pack_chunk(data: &mut Vec<u32>, layout: ContextLayout, rows: usize) -> Result<CudaChunk> {
    const OP: &str = "prepare_context";
    let cache_slots = push(data, layout.cache_slots.iter().copied());
    let dense_slots = push(data, layout.dense_slots.iter().copied());
    // Each token's offset into the chunk's dense tables: its sequence's first entry.
    let mut tok_table = Vec::with_capacity(rows);
    let mut offset = 0;
    for s in &layout.dense.seqs {
        tok_table.extend(std::iter::repeat_n(to_u32(OP, offset)?, s.num_tokens));
        offset += s.block_table.len();
    }
    let dense_tok_table = push(data, tok_table);
    let tables = layout.dense.seqs.iter().flat_map(|s| s.block_table.iter());
    let dense_tables = push(data, tables.copied());
    Ok(CudaChunk {
        layout,
        cache_slots,
        dense_slots,
        dense_tok_table,
        dense_tables,
    })
}

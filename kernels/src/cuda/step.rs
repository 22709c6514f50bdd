//! Per-step metadata on the device ([`CudaStep`]).
//!
//! Built once per forward step: the token ids, each token's RoPE angles (computed on the host by
//! the CPU backend's own function, so both backends rotate by bit-identical angles), position,
//! cache slot and block table, packed into one buffer and uploaded with one copy, then read by
//! every layer. A shaped step (for a CUDA graph) keeps one layout whatever the batch: rows padded
//! to the shape (token 0 at position 0, reading block 0, writing to the [`NO_SLOT`] sentinel that
//! `write_kv` skips), every block table padded to the shape's width, and a live-row count that
//! the expert counts read on the device. [`CudaBackend::update_step`](crate::Backend::update_step)
//! rewrites its buffer in place, so a graph captured over it reads the next step's metadata.

use std::ops::Range;
use std::sync::atomic::AtomicUsize;

use cudarc::driver::{CudaSlice, CudaView};

use super::device::{CudaBackend, to_u32};
use crate::{BackendError, Result, RopeLayout, RopeTable, StepMeta, StepShape};

/// The cache slot of a padding row: `write_kv` writes nothing for it.
pub(super) const NO_SLOT: u32 = u32::MAX;

/// Where each array sits in a step's packed buffer. Fixed-size arrays first and the block tables
/// last, so that a shape fixes every offset.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    /// One entry: the rows that are the step's own tokens (the rest are padding).
    live: Range<usize>,
    /// Token id of each row.
    ids: Range<usize>,
    /// Position of each row.
    tok_pos: Range<usize>,
    /// Offset in `tables` of each row's block table.
    tok_table: Range<usize>,
    /// `block * block_size + slot` where each row's key and value go ([`NO_SLOT`] for padding).
    slots: Range<usize>,
    /// `[rows, half]` f32 each (as bit patterns), already multiplied by the attention scaling.
    cos: Range<usize>,
    sin: Range<usize>,
    /// Every sequence's block table, one after the other (each `table_width` wide when shaped).
    tables: Range<usize>,
    /// `(first token, tokens)` of each tile of the tiled prompt kernel (`plan::prefill_tiles`);
    /// none for a shaped step, which graphs replay with the decode kernels.
    tiles: Range<usize>,
}

/// A step's packed metadata on the host, ready to upload.
struct Packed {
    data: Vec<u32>,
    layout: Layout,
    rows: usize,
    /// The largest block any row reads (checked against a cache's size).
    max_block: Option<u32>,
}

/// Appends `part` to `packed` and returns where it went.
pub(super) fn push(packed: &mut Vec<u32>, part: impl IntoIterator<Item = u32>) -> Range<usize> {
    let start = packed.len();
    packed.extend(part);
    start..packed.len()
}

/// Packs `meta` (validated, and fitting `shape` when there is one).
fn pack(
    op: &'static str,
    meta: &StepMeta,
    rope: &RopeTable,
    shape: Option<StepShape>,
) -> Result<Packed> {
    let bs = meta.block_size;
    let tokens = meta.num_tokens();
    let rows = shape.map_or(tokens, |s| s.rows);
    let (mut tok_table, mut tables, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    let mut max_block = None;
    for s in &meta.seqs {
        let used = &s.block_table[..s.blocks_used(bs)];
        max_block = max_block.max(used.iter().copied().max());
        let offset = to_u32(op, tables.len())?;
        match shape {
            // Only the used blocks: a table may list more than the shape's width.
            Some(sh) => {
                tables.extend_from_slice(used);
                tables.resize(tables.len() + sh.table_width - used.len(), 0);
            }
            None => tables.extend_from_slice(&s.block_table),
        }
        for pos in s.context_len - s.num_tokens..s.context_len {
            tok_table.push(offset);
            slots.push(to_u32(
                op,
                s.block_table[pos / bs] as usize * bs + pos % bs,
            )?);
        }
    }
    let mut positions = meta.positions();
    let mut ids = meta.tokens.clone();
    if let Some(sh) = shape {
        // Padding rows read the zero-filled tables after the sequences' (block 0, which every
        // cache has).
        let padding = rows - tokens;
        for j in 0..padding {
            tok_table.push(to_u32(op, (meta.seqs.len() + j) * sh.table_width)?);
        }
        tables.resize(rows * sh.table_width, 0);
        slots.resize(rows, NO_SLOT);
        positions.resize(rows, 0);
        ids.resize(rows, 0);
        if padding > 0 {
            max_block = max_block.max(Some(0));
        }
    }
    let (cos, sin) =
        crate::cpu::ops::rope_angles(&positions, &rope.inv_freq, rope.attention_scaling);
    let tiles = match shape {
        Some(_) => Vec::new(),
        None => super::plan::prefill_tiles(meta.seqs.iter().map(|s| s.num_tokens)),
    };
    let mut tile_data = Vec::with_capacity(2 * tiles.len());
    for &(first, n) in &tiles {
        tile_data.extend([to_u32(op, first)?, to_u32(op, n)?]);
    }
    let mut data = Vec::new();
    let layout = Layout {
        live: push(&mut data, [to_u32(op, tokens)?]),
        ids: push(&mut data, ids),
        tok_pos: push(&mut data, positions),
        tok_table: push(&mut data, tok_table),
        slots: push(&mut data, slots),
        cos: push(&mut data, cos.iter().map(|v| v.to_bits())),
        sin: push(&mut data, sin.iter().map(|v| v.to_bits())),
        tables: push(&mut data, tables),
        tiles: push(&mut data, tile_data),
    };
    Ok(Packed {
        data,
        layout,
        rows,
        max_block,
    })
}

/// A forward step's metadata, resident on the device.
pub struct CudaStep {
    pub(super) meta: StepMeta,
    /// Token rows: the step's tokens, then a shaped step's padding.
    pub(super) rows: usize,
    /// Set for a step made to be replayed by a graph.
    shape: Option<StepShape>,
    /// Rotary pairs per head (`rot_dim / 2`).
    pub(super) half: usize,
    pub(super) layout: RopeLayout,
    /// Every array of [`Layout`], one after the other (f32 arrays as their bit patterns).
    packed: CudaSlice<u32>,
    parts: Layout,
    /// The largest block any row reads (checked against a cache's size).
    pub(super) max_block: Option<u32>,
    /// The fewest blocks of any cache this step was checked against (`usize::MAX` before the
    /// first): a rewritten step must stay below it, since a graph replays without checking.
    pub(super) cache_blocks: AtomicUsize,
    /// Set by `prepare_context` (cuda/context.rs): the chunks of the step's contexts.
    pub(super) context: Option<super::context::CudaContext>,
}

impl CudaStep {
    fn part(&self, r: &Range<usize>) -> CudaView<'_, u32> {
        self.packed.slice(r.clone())
    }

    /// The cosines, as f32 bit patterns: kernels declare them `const float*`.
    pub(super) fn cos(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.cos)
    }

    /// The sines, as f32 bit patterns (see [`CudaStep::cos`]).
    pub(super) fn sin(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.sin)
    }

    pub(super) fn ids(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.ids)
    }

    pub(super) fn live(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.live)
    }

    pub(super) fn tok_pos(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.tok_pos)
    }

    pub(super) fn tok_table(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.tok_table)
    }

    pub(super) fn tables(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.tables)
    }

    pub(super) fn slots(&self) -> CudaView<'_, u32> {
        self.part(&self.parts.slots)
    }

    /// The tiled prompt kernel's work list, (first token, tokens) pairs, and how many pairs.
    pub(super) fn tiles(&self) -> (CudaView<'_, u32>, usize) {
        (self.part(&self.parts.tiles), self.parts.tiles.len() / 2)
    }

    /// The longest span of positions a row attends, which sizes split-K attention: the shape's
    /// for a shaped step, whose launches must serve every step it will be rewritten with.
    pub(super) fn max_span(&self, window: Option<usize>) -> usize {
        match self.shape {
            Some(s) => window.map_or(s.max_span, |w| s.max_span.min(w.max(1))),
            None => self.meta.max_span(window),
        }
    }
}

impl CudaBackend {
    pub(super) fn prepare_step_impl(
        &self,
        meta: &StepMeta,
        rope: &RopeTable,
        shape: Option<StepShape>,
    ) -> Result<CudaStep> {
        const OP: &str = "prepare_step";
        meta.validate(OP)?;
        if let Some(sh) = shape {
            if sh.rows == 0 || sh.table_width == 0 {
                return Err(BackendError::invalid(OP, format!("step shape {sh:?}")));
            }
            sh.check(OP, meta)?;
        }
        let p = pack(OP, meta, rope, shape)?;
        Ok(CudaStep {
            meta: meta.clone(),
            rows: p.rows,
            shape,
            half: rope.inv_freq.len(),
            layout: rope.layout,
            packed: self.upload(OP, &p.data)?,
            parts: p.layout,
            max_block: p.max_block,
            cache_blocks: AtomicUsize::new(usize::MAX),
            context: None,
        })
    }

    pub(super) fn update_step_impl(
        &self,
        step: &mut CudaStep,
        meta: &StepMeta,
        rope: &RopeTable,
    ) -> Result<()> {
        const OP: &str = "update_step";
        let Some(shape) = step.shape else {
            return Err(BackendError::invalid(
                OP,
                "the step was not prepared with a shape",
            ));
        };
        if (rope.inv_freq.len(), rope.layout) != (step.half, step.layout) {
            return Err(BackendError::invalid(OP, "a different RoPE table"));
        }
        meta.validate(OP)?;
        shape.check(OP, meta)?;
        let p = pack(OP, meta, rope, Some(shape))?;
        let limit = *step.cache_blocks.get_mut();
        if let Some(b) = p.max_block
            && b as usize >= limit
        {
            return Err(BackendError::invalid(
                OP,
                format!("block {b} beyond a cache of {limit} blocks"),
            ));
        }
        if p.layout != step.parts {
            return Err(BackendError::device(
                OP,
                "the packed layout of a shaped step changed",
            ));
        }
        self.stream
            .memcpy_htod(&p.data, &mut step.packed)
            .map_err(|e| BackendError::device(OP, e))?;
        step.meta = meta.clone();
        step.max_block = p.max_block;
        step.context = None;
        Ok(())
    }
}

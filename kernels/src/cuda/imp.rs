//! [`Backend`] for [`CudaBackend`]: each operation delegates to the module that implements it
//! (`ops`, `attention`, `moe`).

use super::attention::CudaKv;
use super::device::{CudaBackend, CudaTensor, CudaWeight};
use super::graph::DeviceGraph;
use super::moe::CudaRouting;
use super::step::CudaStep;
use std::ops::Range;

use crate::{
    AttentionParams, AttentionPart, Backend, BackendError, DeviceMemory, ExpertWeights, HostTensor,
    KvRows, KvSpec, MemoryUse, Result, RopeApply, RopeTable, RouterParams, RowSummary, StepMeta,
    StepShape,
};

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Step = CudaStep;
    type KvLayer = CudaKv;
    type Routing = CudaRouting;
    type Graph = DeviceGraph;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }

    fn upload_weight(&self, w: HostTensor) -> Result<CudaWeight> {
        self.upload_weight_impl(w)
    }

    fn weight_shape<'a>(&self, w: &'a CudaWeight) -> &'a [usize] {
        &w.shape
    }

    fn tensor_from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(BackendError::shape(
                "tensor_from_host",
                format!("{} values for {rows}x{cols}", data.len()),
            ));
        }
        Ok(CudaTensor {
            data: self.upload("tensor_from_host", &data)?,
            rows,
            cols,
        })
    }

    fn tensor_to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.download("tensor_to_host", &t.data, t.rows * t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.tensor("zeros", rows, cols)
    }

    fn dims(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn row_summaries(&self, x: &CudaTensor, rows: usize) -> Result<Vec<RowSummary>> {
        self.row_summaries_impl(x, rows)
    }

    fn prepare_step(&self, meta: &StepMeta, rope: &RopeTable) -> Result<CudaStep> {
        self.prepare_step_impl(meta, rope, None)
    }

    fn prepare_step_shaped(
        &self,
        meta: &StepMeta,
        rope: &RopeTable,
        shape: StepShape,
    ) -> Result<CudaStep> {
        self.prepare_step_impl(meta, rope, Some(shape))
    }

    fn update_step(&self, step: &mut CudaStep, meta: &StepMeta, rope: &RopeTable) -> Result<()> {
        self.update_step_impl(step, meta, rope)
    }

    fn capture<F: FnOnce() -> Result<()>>(&self, body: F) -> Result<DeviceGraph> {
        self.capture_impl(body)
    }

    fn replay(&self, graph: &DeviceGraph) -> Result<()> {
        self.replay_impl(graph)
    }

    fn copy_into(&self, dst: &mut CudaTensor, src: &CudaTensor) -> Result<()> {
        self.copy_into_impl(dst, src)
    }

    fn pack_into(&self, dst: &mut CudaTensor, offset: usize, src: &CudaTensor) -> Result<()> {
        self.pack_into_impl(dst, offset, src)
    }

    fn summarize_rows(&self, x: &CudaTensor, rows: usize) -> Result<CudaTensor> {
        self.summarize_rows_impl(x, rows)
    }

    fn embedding(&self, table: &CudaWeight, step: &CudaStep) -> Result<CudaTensor> {
        self.embedding_impl(table, step)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        self.linear_impl(x, w, bias, None)
    }

    fn linear_rows(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        rows: Range<usize>,
    ) -> Result<CudaTensor> {
        self.linear_impl(x, w, None, Some(rows))
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        self.rms_norm_impl(x, w, eps)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        self.add_assign_impl(x, y)
    }

    fn norm_rope(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
        step: &CudaStep,
        at: RopeApply,
    ) -> Result<CudaTensor> {
        self.norm_rope_impl(x, w, eps, step, at)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaTensor,
        y: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.add_rms_norm_impl(x, y, w, eps)
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.silu_mul_impl(gate, up)
    }

    fn mul_sigmoid_rows(&self, x: &mut CudaTensor, g: &CudaTensor) -> Result<()> {
        self.mul_sigmoid_rows_impl(x, g)
    }

    fn narrow_cols(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        self.narrow_cols_impl(x, start, len)
    }

    fn narrow_rows(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        self.narrow_rows_impl(x, start, len)
    }

    fn write_cols(&self, dst: &mut CudaTensor, start: usize, src: &CudaTensor) -> Result<()> {
        self.write_cols_impl(dst, start, src)
    }

    fn split_heads(
        &self,
        x: &CudaTensor,
        heads: usize,
        a: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        self.split_heads_impl(x, heads, a)
    }

    fn concat_heads(&self, a: &CudaTensor, b: &CudaTensor, heads: usize) -> Result<CudaTensor> {
        self.concat_heads_impl(a, b, heads)
    }

    fn concat_heads_shared(
        &self,
        a: &CudaTensor,
        shared: &CudaTensor,
        heads: usize,
    ) -> Result<CudaTensor> {
        self.concat_heads_shared_impl(a, shared, heads)
    }

    fn head_linear(&self, x: &CudaTensor, w: &CudaWeight, heads: usize) -> Result<CudaTensor> {
        self.head_linear_impl(x, w, heads)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        self.gather_rows_impl(x, rows)
    }

    fn rope(&self, x: &mut CudaTensor, step: &CudaStep, at: RopeApply) -> Result<()> {
        self.rope_impl(x, step, at)
    }

    fn alloc_kv(&self, spec: KvSpec) -> Result<CudaKv> {
        self.alloc_kv_impl(spec)
    }

    fn kv_memory_available(&self) -> Option<u64> {
        self.device_memory().map(|m| m.free)
    }

    fn kv_element_bytes(&self) -> usize {
        // K and V are stored as bf16 (attention.rs).
        2
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let (free, total) = self.ctx.mem_get_info().ok()?;
        Some(DeviceMemory {
            free: free as u64,
            total: total as u64,
        })
    }

    fn trim_memory(&self) -> Result<()> {
        self.trim_memory_impl()
    }

    fn memory_use(&self) -> Result<Option<MemoryUse>> {
        self.memory_use_impl()
    }

    fn write_kv(
        &self,
        cache: &mut CudaKv,
        k: &CudaTensor,
        v: Option<&CudaTensor>,
        step: &CudaStep,
    ) -> Result<()> {
        self.write_kv_impl(cache, k, v, step)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        cache: &CudaKv,
        step: &CudaStep,
        params: &AttentionParams,
    ) -> Result<CudaTensor> {
        self.attention_impl(q, cache, step, params)
    }

    fn prepare_context(&self, step: &mut CudaStep, chunk_positions: Option<usize>) -> Result<()> {
        self.prepare_context_impl(step, chunk_positions)
    }

    fn context_chunks(&self, step: &CudaStep) -> usize {
        step.context.as_ref().map_or(0, |c| c.chunks())
    }

    fn gather_context(&self, cache: &CudaKv, step: &CudaStep, chunk: usize) -> Result<CudaTensor> {
        self.gather_context_impl(cache, step, chunk)
    }

    fn attention_rows(
        &self,
        q: &CudaTensor,
        kv: KvRows<'_, Self>,
        step: &CudaStep,
        params: &AttentionParams,
    ) -> Result<AttentionPart<CudaTensor>> {
        self.attention_rows_impl(q, kv, step, params)
    }

    fn merge_attention(
        &self,
        acc: &mut AttentionPart<CudaTensor>,
        part: &AttentionPart<CudaTensor>,
    ) -> Result<()> {
        self.merge_attention_impl(acc, part)
    }

    fn route(
        &self,
        logits: &CudaTensor,
        params: &RouterParams,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaRouting> {
        self.route_impl(logits, params, bias)
    }

    fn expert_counts(&self, routing: &CudaRouting, num_experts: usize) -> Result<Vec<u32>> {
        self.expert_counts_impl(routing, num_experts)
    }

    fn expert_counts_into(
        &self,
        routings: &[&CudaRouting],
        step: &CudaStep,
        counts: &mut CudaTensor,
    ) -> Result<()> {
        self.expert_counts_into_impl(routings, step, counts)
    }

    fn moe(
        &self,
        x: &CudaTensor,
        routing: &CudaRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        self.moe_impl(x, routing, experts)
    }
}

//! The CUDA backend in a build without the `cuda` feature: a handle that cannot be made.
//!
//! [`CudaBackend`] and its associated types are uninhabited here, yet [`CudaBackend`] implements
//! [`Backend`]: engine code can name `Executor<CudaBackend>` and select a device at run time with
//! no `#[cfg]` of its own, and the only way in, [`CudaBackend::new`], returns
//! [`BackendError::CudaNotAvailable`]. Every method body is an empty `match` on the value that
//! cannot exist, so none of them can run.

use std::ops::Range;

use crate::{
    AttentionParams, AttentionPart, Backend, BackendError, ExpertWeights, HostTensor, KvRows,
    KvSpec, Result, RopeApply, RopeTable, RouterParams, StepMeta,
};

/// A value that cannot exist.
#[derive(Clone, Copy, Debug)]
pub enum Never {}

/// Handle to a CUDA device; this build has no CUDA support, so [`CudaBackend::new`] always fails.
#[derive(Debug)]
pub struct CudaBackend {
    never: Never,
}

/// Device activations (none exist in this build).
pub enum CudaTensor {}
/// Device weights (none exist in this build).
pub enum CudaWeight {}
/// Per-step device metadata (none exists in this build).
pub enum CudaStep {}
/// A device KV-cache layer (none exists in this build).
pub enum CudaKv {}
/// Device routing decisions (none exist in this build).
pub enum CudaRouting {}

impl CudaBackend {
    /// Opens device `ordinal`: always [`BackendError::CudaNotAvailable`] in this build.
    pub fn new(ordinal: usize) -> Result<Self> {
        Err(BackendError::CudaNotAvailable(format!(
            "device {ordinal}: this binary was built without the `cuda` feature \
             (rebuild with `--features cuda`)"
        )))
    }

    /// How many CUDA devices there are: always [`BackendError::CudaNotAvailable`] in this build.
    pub fn device_count() -> Result<usize> {
        Self::new(0).map(|_| 0)
    }

    /// The GPU's UUID; no device exists in this build.
    pub fn uuid(&self) -> Option<String> {
        match self.never {}
    }

    /// The count of launches; no device exists in this build.
    pub fn launch_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        match self.never {}
    }

    /// The tensor-core MoE kernels' switch; no device exists in this build.
    pub fn tensor_core_moe(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        match self.never {}
    }

    /// The tensor-core prompt attention's switch; no device exists in this build.
    pub fn tensor_core_prefill(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        match self.never {}
    }

    /// The device's peak memory bandwidth; no device exists in this build.
    pub fn peak_bandwidth_gb_s(&self) -> Option<f64> {
        match self.never {}
    }

    /// A measured device copy's bandwidth; no device exists in this build.
    pub fn copy_bandwidth_gb_s(&self, _: usize, _: usize) -> Result<f64> {
        match self.never {}
    }

    /// Waits for queued device work; nothing can be queued in this build.
    pub fn synchronize(&self) -> Result<()> {
        match self.never {}
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Step = CudaStep;
    type KvLayer = CudaKv;
    type Routing = CudaRouting;
    type Graph = crate::NoGraph;

    fn name(&self) -> String {
        match self.never {}
    }
    fn upload_weight(&self, _: HostTensor) -> Result<CudaWeight> {
        match self.never {}
    }
    fn weight_shape<'a>(&self, _: &'a CudaWeight) -> &'a [usize] {
        match self.never {}
    }
    fn tensor_from_host(&self, _: Vec<f32>, _: usize, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn tensor_to_host(&self, _: &CudaTensor) -> Result<Vec<f32>> {
        match self.never {}
    }
    fn dims(&self, _: &CudaTensor) -> (usize, usize) {
        match self.never {}
    }
    fn prepare_step(&self, _: &StepMeta, _: &RopeTable) -> Result<CudaStep> {
        match self.never {}
    }
    fn copy_into(&self, _: &mut CudaTensor, _: &CudaTensor) -> Result<()> {
        match self.never {}
    }
    fn pack_into(&self, _: &mut CudaTensor, _: usize, _: &CudaTensor) -> Result<()> {
        match self.never {}
    }
    fn expert_counts_into(
        &self,
        _: &[&CudaRouting],
        _: &CudaStep,
        _: &mut CudaTensor,
    ) -> Result<()> {
        match self.never {}
    }
    fn embedding(&self, _: &CudaWeight, _: &CudaStep) -> Result<CudaTensor> {
        match self.never {}
    }
    fn linear(&self, _: &CudaTensor, _: &CudaWeight, _: Option<&CudaWeight>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn linear_rows(&self, _: &CudaTensor, _: &CudaWeight, _: Range<usize>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn rms_norm(&self, _: &CudaTensor, _: &CudaWeight, _: f32) -> Result<CudaTensor> {
        match self.never {}
    }
    fn add_assign(&self, _: &mut CudaTensor, _: &CudaTensor) -> Result<()> {
        match self.never {}
    }
    fn silu_mul(&self, _: &CudaTensor, _: &CudaTensor) -> Result<CudaTensor> {
        match self.never {}
    }
    fn mul_sigmoid_rows(&self, _: &mut CudaTensor, _: &CudaTensor) -> Result<()> {
        match self.never {}
    }
    fn narrow_cols(&self, _: &CudaTensor, _: usize, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn narrow_rows(&self, _: &CudaTensor, _: usize, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn write_cols(&self, _: &mut CudaTensor, _: usize, _: &CudaTensor) -> Result<()> {
        match self.never {}
    }
    fn split_heads(&self, _: &CudaTensor, _: usize, _: usize) -> Result<(CudaTensor, CudaTensor)> {
        match self.never {}
    }
    fn concat_heads(&self, _: &CudaTensor, _: &CudaTensor, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn concat_heads_shared(&self, _: &CudaTensor, _: &CudaTensor, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn head_linear(&self, _: &CudaTensor, _: &CudaWeight, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn gather_rows(&self, _: &CudaTensor, _: &[usize]) -> Result<CudaTensor> {
        match self.never {}
    }
    fn rope(&self, _: &mut CudaTensor, _: &CudaStep, _: RopeApply) -> Result<()> {
        match self.never {}
    }
    fn alloc_kv(&self, _: KvSpec) -> Result<CudaKv> {
        match self.never {}
    }
    fn write_kv(
        &self,
        _: &mut CudaKv,
        _: &CudaTensor,
        _: Option<&CudaTensor>,
        _: &CudaStep,
    ) -> Result<()> {
        match self.never {}
    }
    fn attention(
        &self,
        _: &CudaTensor,
        _: &CudaKv,
        _: &CudaStep,
        _: &AttentionParams,
    ) -> Result<CudaTensor> {
        match self.never {}
    }
    fn prepare_context(&self, _: &mut CudaStep, _: Option<usize>) -> Result<()> {
        match self.never {}
    }
    fn context_chunks(&self, _: &CudaStep) -> usize {
        match self.never {}
    }
    fn gather_context(&self, _: &CudaKv, _: &CudaStep, _: usize) -> Result<CudaTensor> {
        match self.never {}
    }
    fn attention_rows(
        &self,
        _: &CudaTensor,
        _: KvRows<'_, Self>,
        _: &CudaStep,
        _: &AttentionParams,
    ) -> Result<AttentionPart<CudaTensor>> {
        match self.never {}
    }
    fn merge_attention(
        &self,
        _: &mut AttentionPart<CudaTensor>,
        _: &AttentionPart<CudaTensor>,
    ) -> Result<()> {
        match self.never {}
    }
    fn route(
        &self,
        _: &CudaTensor,
        _: &RouterParams,
        _: Option<&CudaWeight>,
    ) -> Result<CudaRouting> {
        match self.never {}
    }
    fn expert_counts(&self, _: &CudaRouting, _: usize) -> Result<Vec<u32>> {
        match self.never {}
    }
    fn moe(
        &self,
        _: &CudaTensor,
        _: &CudaRouting,
        _: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CudaTensor> {
        match self.never {}
    }
}

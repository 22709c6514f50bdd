//! The backend contract: the operations a decoder forward pass needs, written once for every device.
//!
//! Model code (in `tessera-worker`) is generic over [`Backend`]. Per-step metadata (positions, block
//! tables, RoPE angles) is prepared once per step by [`Backend::prepare_step`], so a device backend
//! uploads it once and every layer reuses it: no host↔device copies hide inside a layer.

use crate::{AttentionPart, BackendError, HostTensor, KvRows, Result, StepMeta, StepShape};

/// How rotary pairs are laid out inside a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeLayout {
    /// Element `i` pairs with `i + rot_dim/2` (GPT-NeoX / Llama / HF `rotate_half`).
    Half,
    /// Element `2i` pairs with `2i + 1` (GPT-J; DeepSeek's `rope_interleave`).
    Interleaved,
}

/// Everything needed to turn positions into rotation angles (built once per model).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    /// One inverse frequency per rotary pair (`rot_dim / 2` of them).
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
    pub layout: RopeLayout,
}

impl RopeTable {
    pub fn rot_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }
}

/// Where the rotary part sits inside each head of a projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeApply {
    pub num_heads: usize,
    /// Columns from one head to the next.
    pub head_stride: usize,
    /// Column of the first rotary element inside a head.
    pub offset: usize,
}

/// Where a KV cache keeps its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvValues {
    /// A value row of `v_dim` beside every key row.
    Separate,
    /// No value storage: a position's value is the first `v_dim` elements of its key. MLA's
    /// latent cache, whose key row is `[compressed latent | rotary key]` and whose value is the
    /// latent.
    KeyPrefix,
}

/// Shape of one layer's paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSpec {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub values: KvValues,
}

impl KvSpec {
    /// Elements of K and of V storage (none for [`KvValues::KeyPrefix`]), or `None` if a count
    /// overflows `usize` (a block count from the network can be anything).
    pub fn elements(&self) -> Option<(usize, usize)> {
        let rows = self
            .num_blocks
            .checked_mul(self.block_size)?
            .checked_mul(self.num_kv_heads)?;
        let v = match self.values {
            KvValues::Separate => rows.checked_mul(self.v_dim)?,
            KvValues::KeyPrefix => 0,
        };
        Some((rows.checked_mul(self.k_dim)?, v))
    }

    /// Elements from one value row to the next in the storage values are read from: the key
    /// rows for [`KvValues::KeyPrefix`].
    pub fn v_stride(&self) -> usize {
        match self.values {
            KvValues::Separate => self.v_dim,
            KvValues::KeyPrefix => self.k_dim,
        }
    }

    /// Checks a step's keys and values, `(rows, cols)`, against this cache for `tokens` new
    /// tokens: one row per token, one key (and value, where stored) per KV head.
    pub(crate) fn check_write(
        &self,
        tokens: usize,
        k: (usize, usize),
        v: Option<(usize, usize)>,
    ) -> Result<()> {
        use crate::BackendError;
        const OP: &str = "write_kv";
        match (self.values, v) {
            (KvValues::Separate, None) => {
                return Err(BackendError::invalid(
                    OP,
                    "no values for a cache that stores them",
                ));
            }
            (KvValues::KeyPrefix, Some(_)) => {
                return Err(BackendError::invalid(
                    OP,
                    "values for a cache that takes them from its keys",
                ));
            }
            _ => {}
        }
        let kw = self.num_kv_heads * self.k_dim;
        let vw = self.num_kv_heads * self.v_dim;
        if k != (tokens, kw) || v.is_some_and(|v| v != (tokens, vw)) {
            return Err(BackendError::shape(
                OP,
                format!("k {k:?} and v {v:?} for {tokens} tokens of widths {kw}/{vw}"),
            ));
        }
        Ok(())
    }

    /// Checks what no backend can store: values longer than the keys they are a prefix of.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.values == KvValues::KeyPrefix && self.v_dim > self.k_dim {
            return Err(crate::BackendError::invalid(
                op,
                format!("values of {} taken from keys of {}", self.v_dim, self.k_dim),
            ));
        }
        Ok(())
    }

    /// Bytes of K and V together at `element_bytes` per element (the backend's
    /// [`Backend::kv_element_bytes`]), or `None` on overflow.
    pub fn bytes(&self, element_bytes: usize) -> Option<u64> {
        let (k, v) = self.elements()?;
        let elems = u64::try_from(k).ok()?.checked_add(u64::try_from(v).ok()?)?;
        elems.checked_mul(element_bytes as u64)
    }
}

/// A device's memory, as the driver reports it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

/// Device memory this process's allocators hold ([`Backend::memory_use`]): what a step takes
/// from the device, measured rather than guessed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Bytes the stream-ordered pool (weights, KV cache, eager activations) reserves now.
    pub pool: u64,
    /// The most it reserved since the last [`Backend::trim_memory`].
    pub pool_peak: u64,
    /// Bytes the memory of graphs (allocations made while capturing) reserves now.
    pub graphs: u64,
    /// The most it reserved since the last [`Backend::trim_memory`].
    pub graphs_peak: u64,
}

/// Attention over the paged cache for a step (causal within each sequence).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub qk_dim: usize,
    pub v_dim: usize,
    /// Softmax scale applied to q·k.
    pub scale: f32,
    /// Attend only to the last `w` positions (inclusive of the query's own).
    pub sliding_window: Option<usize>,
}

impl AttentionParams {
    /// Query heads must split evenly over at least one KV head.
    pub fn check_heads(&self, op: &'static str) -> Result<()> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(BackendError::shape(
                op,
                format!(
                    "{} query heads over {} kv heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        Ok(())
    }
}

/// How router logits become per-expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// How a group of experts is scored when routing is group-limited (DeepSeek).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GroupScore {
    /// The best expert of the group (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of the two best experts (DeepSeek-V3 `noaux_tc`).
    SumTop2,
}

/// Top-k routing rule, covering softmax top-k (Mixtral, Qwen, OLMoE) and DeepSeek's grouped,
/// bias-corrected sigmoid routing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterParams {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    /// Renormalise the selected weights to sum to one.
    pub normalize: bool,
    /// `(n_group, topk_group, group score)`: only experts of the best `topk_group` groups compete.
    pub groups: Option<(usize, usize, GroupScore)>,
    /// Multiplies the final weights (DeepSeek's `routed_scaling_factor`; 1 otherwise).
    pub scaling: f32,
}

/// The three projections of one gated-MLP expert.
pub struct ExpertWeights<'a, B: Backend> {
    pub gate: &'a B::Weight,
    pub up: &'a B::Weight,
    pub down: &'a B::Weight,
}

/// What greedy decoding needs from one row of logits: the index of its largest value (ties go to
/// the lowest index, as the sampler's greedy choice), that value, and the row's log-sum-exp, so
/// the chosen token's log-probability is `max - log_sum_exp`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSummary {
    pub argmax: u32,
    pub max: f32,
    pub log_sum_exp: f32,
}

impl RowSummary {
    /// The summary of one row computed on the host; `None` for an empty row.
    pub fn of(row: &[f32]) -> Option<RowSummary> {
        let (argmax, &max) = row
            .iter()
            .enumerate()
            .reduce(|best, cur| if cur.1 > best.1 { cur } else { best })?;
        Some(RowSummary {
            argmax: argmax as u32,
            max,
            log_sum_exp: crate::cpu::log_sum_exp(row),
        })
    }

    /// The log-probability of the argmax token.
    pub fn logprob(&self) -> f32 {
        self.max - self.log_sum_exp
    }

    /// Floats per summary in [`Backend::summarize_rows`]' layout.
    pub const PACKED: usize = 3;

    /// The summary in [`Backend::summarize_rows`]' layout: the argmax's bits, the max, the
    /// log-sum-exp.
    pub fn packed(&self) -> [f32; 3] {
        [f32::from_bits(self.argmax), self.max, self.log_sum_exp]
    }

    /// Summaries from floats in [`Backend::summarize_rows`]' layout.
    pub fn unpack(packed: &[f32]) -> Vec<RowSummary> {
        packed
            .chunks_exact(Self::PACKED)
            .map(|r| RowSummary {
                argmax: r[0].to_bits(),
                max: r[1],
                log_sum_exp: r[2],
            })
            .collect()
    }
}

/// The per-head widths of [`Backend::concat_heads`] of a `[rows, a_cols]` and a `[rows, b_cols]`
/// activation in `heads` heads: `(a per head, b per head)`, or the shape error both backends give.
pub fn concat_heads_widths(
    a: (usize, usize),
    b: (usize, usize),
    heads: usize,
) -> Result<(usize, usize)> {
    if heads == 0 || a.0 != b.0 || !a.1.is_multiple_of(heads) || !b.1.is_multiple_of(heads) {
        return Err(BackendError::shape(
            "concat_heads",
            format!("{}x{} and {}x{} in {heads} heads", a.0, a.1, b.0, b.1),
        ));
    }
    Ok((a.1 / heads, b.1 / heads))
}

/// The per-head width of `a` and the shared width in [`Backend::concat_heads_shared`] of a
/// `[rows, a_cols]` and a `[rows, shared_cols]` activation, or the shape error both backends give.
pub fn concat_shared_widths(
    a: (usize, usize),
    shared: (usize, usize),
    heads: usize,
) -> Result<(usize, usize)> {
    if heads == 0 || a.0 != shared.0 || !a.1.is_multiple_of(heads) {
        return Err(BackendError::shape(
            "concat_heads_shared",
            format!(
                "{}x{} in {heads} heads and {}x{} shared",
                a.0, a.1, shared.0, shared.1
            ),
        ));
    }
    Ok((a.1 / heads, shared.1))
}

/// The output width per head of [`Backend::head_linear`] with a `[rows, k]` weight over `x_cols`
/// input columns in `heads` heads, or the shape error both backends give.
pub fn head_linear_width(x_cols: usize, w_shape: &[usize], heads: usize) -> Result<usize> {
    const OP: &str = "head_linear";
    let [rows, k] = *w_shape else {
        return Err(BackendError::shape(
            OP,
            format!("expected a 2-D weight, got {w_shape:?}"),
        ));
    };
    if heads == 0 || !rows.is_multiple_of(heads) || x_cols != heads * k {
        return Err(BackendError::shape(
            OP,
            format!("x has {x_cols} columns for {heads} heads of weight {w_shape:?}"),
        ));
    }
    Ok(rows / heads)
}

/// Checks a [`Backend::row_summaries`] request for `rows` rows of a `(rows, cols)` tensor.
pub fn check_summary_rows(rows: usize, dims: (usize, usize)) -> Result<()> {
    if dims.1 == 0 || rows > dims.0 {
        return Err(BackendError::shape(
            "row_summaries",
            format!("{rows} rows of a {}x{} tensor", dims.0, dims.1),
        ));
    }
    Ok(())
}

/// Checks the `[routings, experts]` tensor [`Backend::expert_counts_into`] counts into.
pub fn check_counts_rows(op: &'static str, routings: usize, counts: (usize, usize)) -> Result<()> {
    if counts.0 != routings {
        return Err(BackendError::shape(
            op,
            format!("{} rows of counts for {routings} routings", counts.0),
        ));
    }
    Ok(())
}

/// Checks a [`Backend::copy_into`] of a `src` tensor into the first rows of `dst`.
pub fn check_copy_into(dst: (usize, usize), src: (usize, usize)) -> Result<()> {
    if dst.1 != src.1 || dst.0 < src.0 {
        return Err(BackendError::shape(
            "copy_into",
            format!("{}x{} into {}x{}", src.0, src.1, dst.0, dst.1),
        ));
    }
    Ok(())
}

/// Checks [`Backend::pack_into`]'s `src_len` elements at `offset` of a `dst_len`-element tensor.
pub fn check_pack_into(dst_len: usize, offset: usize, src_len: usize) -> Result<()> {
    if offset.checked_add(src_len).is_none_or(|end| end > dst_len) {
        return Err(BackendError::shape(
            "pack_into",
            format!("{src_len} elements at {offset} of {dst_len}"),
        ));
    }
    Ok(())
}

/// Checks [`Backend::linear_rows`]' output rows `rows` of a weight with `out` rows.
pub fn check_weight_rows(rows: &std::ops::Range<usize>, out: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > out {
        return Err(BackendError::shape(
            "linear_rows",
            format!(
                "rows {}..{} of a weight with {out} rows",
                rows.start, rows.end
            ),
        ));
    }
    Ok(())
}

/// Checks [`Backend::narrow_rows`]: rows `start .. start + len` of a tensor with `rows` rows.
pub fn check_narrow_rows(rows: usize, start: usize, len: usize) -> Result<()> {
    if start.checked_add(len).is_none_or(|end| end > rows) {
        return Err(BackendError::shape(
            "narrow_rows",
            format!("rows {start}+{len} of {rows}"),
        ));
    }
    Ok(())
}

/// Checks [`Backend::write_cols`]: `src` (rows, cols) at column `start` of `dst` (rows, cols).
pub fn check_write_cols(dst: (usize, usize), start: usize, src: (usize, usize)) -> Result<()> {
    if dst.0 != src.0 || start.checked_add(src.1).is_none_or(|end| end > dst.1) {
        return Err(BackendError::shape(
            "write_cols",
            format!(
                "{}x{} at column {start} of {}x{}",
                src.0, src.1, dst.0, dst.1
            ),
        ));
    }
    Ok(())
}

/// The graph type of a backend that has none: no value of it exists.
pub enum NoGraph {}

/// A compute device. Activations are `[rows, cols]` f32 matrices ([`Backend::Tensor`]); weights keep
/// their stored dtype ([`Backend::Weight`]).
pub trait Backend: Send + Sync + Sized + 'static {
    type Tensor: Send + Sync;
    type Weight: Send + Sync;
    /// Per-step metadata resident on the device.
    type Step: Send + Sync;
    /// One layer's paged K and V cache.
    type KvLayer: Send + Sync;
    /// Router decisions: for each token, `top_k` (expert, weight) pairs.
    type Routing: Send + Sync;
    /// Captured device work ([`Backend::capture`]); [`NoGraph`] where there is none.
    type Graph: Send + Sync;

    /// Short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;

    // --- data movement -------------------------------------------------------------------------
    fn upload_weight(&self, w: HostTensor) -> Result<Self::Weight>;
    fn weight_shape<'a>(&self, w: &'a Self::Weight) -> &'a [usize];
    fn tensor_from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Tensor>;
    fn tensor_to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// A zeroed `[rows, cols]` tensor made on the device (a memset, not a copy from the host).
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.tensor_from_host(vec![0.0; rows * cols], rows, cols)
    }
    /// `(rows, cols)` of an activation.
    fn dims(&self, t: &Self::Tensor) -> (usize, usize);
    /// [`RowSummary`] of the first `rows` rows of `x` (logits; a graph's output may hold more
    /// rows than the step has), without copying the rows to the host where the backend can help
    /// it (a GPU copies three numbers per row instead of the vocabulary).
    fn row_summaries(&self, x: &Self::Tensor, rows: usize) -> Result<Vec<RowSummary>> {
        let (have, cols) = self.dims(x);
        check_summary_rows(rows, (have, cols))?;
        let host = self.tensor_to_host(x)?;
        Ok(host
            .chunks(cols)
            .take(rows)
            .filter_map(RowSummary::of)
            .collect())
    }
    /// [`Backend::row_summaries`] left on the device as a `[rows, RowSummary::PACKED]` tensor
    /// ([`RowSummary::unpack`] reads it), so that a graph can bring them to the host together
    /// with its other results ([`Backend::pack_into`]) in one copy.
    fn summarize_rows(&self, x: &Self::Tensor, rows: usize) -> Result<Self::Tensor> {
        let packed: Vec<f32> = self
            .row_summaries(x, rows)?
            .iter()
            .flat_map(RowSummary::packed)
            .collect();
        self.tensor_from_host(packed, rows, RowSummary::PACKED)
    }
    /// The device's copy of a step's metadata, token ids included, sized to the step.
    fn prepare_step(&self, meta: &StepMeta, rope: &RopeTable) -> Result<Self::Step>;
    /// A step padded to `shape` (see [`StepShape`]), whose contents [`Backend::update_step`]
    /// rewrites in place for the next replay of a graph captured over it. Backends without
    /// graphs do not support it.
    fn prepare_step_shaped(
        &self,
        _meta: &StepMeta,
        _rope: &RopeTable,
        _shape: StepShape,
    ) -> Result<Self::Step> {
        Err(BackendError::Unsupported {
            op: "prepare_step_shaped",
            backend: "this backend",
        })
    }
    /// Rewrites a shaped step with `meta`, which must fit its shape, without moving it.
    fn update_step(
        &self,
        _step: &mut Self::Step,
        _meta: &StepMeta,
        _rope: &RopeTable,
    ) -> Result<()> {
        Err(BackendError::Unsupported {
            op: "update_step",
            backend: "this backend",
        })
    }

    // --- graphs --------------------------------------------------------------------------------
    /// Captures the device work `body` queues, for [`Backend::replay`]. What a graph cannot hold
    /// (a copy to or from the host, a synchronisation) fails the capture with an error; so does
    /// a backend without graphs. Tensors `body` allocates belong to the graph: it must drop them
    /// before returning, and copy what it keeps into tensors made before the capture
    /// ([`Backend::copy_into`]).
    fn capture<F: FnOnce() -> Result<()>>(&self, _body: F) -> Result<Self::Graph> {
        Err(BackendError::Unsupported {
            op: "capture",
            backend: "this backend",
        })
    }
    /// Runs a captured graph again, with whatever its inputs hold now.
    fn replay(&self, _graph: &Self::Graph) -> Result<()> {
        Err(BackendError::Unsupported {
            op: "replay",
            backend: "this backend",
        })
    }
    /// Copies `src` into the first rows of `dst` (same columns, `dst` at least as tall) without
    /// moving `dst`.
    fn copy_into(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<()>;
    /// Copies every element of `src` (row-major) into `dst`'s elements from `offset` on, whatever
    /// the shapes: results of different widths gathered into one buffer for one copy to the host.
    fn pack_into(&self, dst: &mut Self::Tensor, offset: usize, src: &Self::Tensor) -> Result<()>;

    // --- dense math ----------------------------------------------------------------------------
    /// Rows of an embedding table `[vocab, hidden]`, one per row of the step (its token ids).
    fn embedding(&self, table: &Self::Weight, step: &Self::Step) -> Result<Self::Tensor>;
    /// `x · Wᵀ (+ bias)` for `W: [out, in]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor>;
    /// `x · W[rows]ᵀ` for `W: [out, in]`: the product with the output rows `rows` alone, read
    /// where they are stored (MLA's expanded form takes `kv_b_proj` a few heads at a time).
    fn linear_rows(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        rows: std::ops::Range<usize>,
    ) -> Result<Self::Tensor>;
    /// `[x · W_iᵀ (+ b_i)]` for several weights applied to the same input (q, k and v), in one
    /// call so that a backend can run them as one pass. The default calls [`Backend::linear`].
    fn linear_many(
        &self,
        x: &Self::Tensor,
        layers: &[(&Self::Weight, Option<&Self::Weight>)],
    ) -> Result<Vec<Self::Tensor>> {
        layers.iter().map(|(w, b)| self.linear(x, w, *b)).collect()
    }
    /// The gated MLP `down(silu(gate(x)) · up(x))`, in one call so that a backend can fuse it.
    /// The default composes [`Backend::linear`] and [`Backend::silu_mul`].
    fn mlp(&self, x: &Self::Tensor, w: &ExpertWeights<'_, Self>) -> Result<Self::Tensor> {
        let h = self.silu_mul(&self.linear(x, w.gate, None)?, &self.linear(x, w.up, None)?)?;
        self.linear(&h, w.down, None)
    }
    /// RMSNorm over each contiguous group of `w.len()` columns (a whole row, or one head).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x += y`, then the RMSNorm of the new `x` with `w` (groups as [`Backend::rms_norm`]): a
    /// residual add and the next pre-norm, in one call so that a backend can do both in one pass
    /// over the rows. The default composes the two.
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.add_assign(x, y)?;
        self.rms_norm(x, w, eps)
    }
    /// RMSNorm with `w` over groups of `w.len()` columns, then RoPE at `at`: what Qwen3 does to
    /// its queries and keys (a norm per head, then the rotation), in one call so that a backend
    /// can do both in one pass. The default composes [`Backend::rms_norm`] and [`Backend::rope`].
    fn norm_rope(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        step: &Self::Step,
        at: RopeApply,
    ) -> Result<Self::Tensor> {
        let mut y = self.rms_norm(x, w, eps)?;
        self.rope(&mut y, step, at)?;
        Ok(y)
    }
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x[r, :] *= sigmoid(g[r, 0])` (Qwen2-MoE's shared-expert gate).
    fn mul_sigmoid_rows(&self, x: &mut Self::Tensor, g: &Self::Tensor) -> Result<()>;
    /// Columns `start .. start + len`.
    fn narrow_cols(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;
    /// Rows `start .. start + len` (a contiguous part of the step's tokens).
    fn narrow_rows(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;
    /// Writes `src: [T, c]` into columns `start .. start + c` of `dst: [T, _]` (the inverse of
    /// [`Backend::narrow_cols`]).
    fn write_cols(&self, dst: &mut Self::Tensor, start: usize, src: &Self::Tensor) -> Result<()>;
    /// Splits every head of `x: [T, heads*(a+b)]` into `([T, heads*a], [T, heads*b])`.
    fn split_heads(
        &self,
        x: &Self::Tensor,
        heads: usize,
        a: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Joins head `h` of `a: [T, heads*da]` and head `h` of `b: [T, heads*db]` into head `h` of
    /// `[T, heads*(da+db)]` (the inverse of [`Backend::split_heads`]).
    fn concat_heads(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        heads: usize,
    ) -> Result<Self::Tensor>;
    /// Joins head `h` of `a: [T, heads*da]` with all of `shared: [T, ds]` into head `h` of
    /// `[T, heads*(da+ds)]`: one part every head has (MLA's rotary key, shared by all heads).
    fn concat_heads_shared(
        &self,
        a: &Self::Tensor,
        shared: &Self::Tensor,
        heads: usize,
    ) -> Result<Self::Tensor>;
    /// A product per head: `x: [T, heads*k]` and `w: [heads*n, k]` (head `h`'s `[n, k]` block)
    /// give `[T, heads*n]` with head `h` = `x_h · w_hᵀ` (MLA's absorbed up-projections).
    fn head_linear(&self, x: &Self::Tensor, w: &Self::Weight, heads: usize)
    -> Result<Self::Tensor>;
    /// The listed rows, in order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;

    // --- attention -----------------------------------------------------------------------------
    fn rope(&self, x: &mut Self::Tensor, step: &Self::Step, at: RopeApply) -> Result<()>;
    fn alloc_kv(&self, spec: KvSpec) -> Result<Self::KvLayer>;
    /// Bytes a KV cache could still take, if the backend can tell: callers refuse a larger cache
    /// instead of letting the allocation abort the process. `None`: no limit known.
    fn kv_memory_available(&self) -> Option<u64> {
        None
    }
    /// Bytes of one stored K or V element (f32 on the CPU, bf16 on the GPU).
    fn kv_element_bytes(&self) -> usize {
        std::mem::size_of::<f32>()
    }
    /// The memory of a device with its own (GPU), for sizing the KV cache from what is left after
    /// the weights; `None` for host memory.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Waits for queued work, hands memory the allocators cache but no allocation uses back to
    /// the device, and starts [`Backend::memory_use`]'s high-water marks again from what is held
    /// now. Nothing to do on the CPU.
    fn trim_memory(&self) -> Result<()> {
        Ok(())
    }
    /// What this process's allocators hold on the device, and at most since the last
    /// [`Backend::trim_memory`]; `None` where the backend cannot tell (host memory, a GPU without
    /// memory pools).
    fn memory_use(&self) -> Result<Option<MemoryUse>> {
        Ok(None)
    }
    /// Stores the step's new keys and values into their slots; `v` is `None` exactly when the
    /// cache takes its values from the keys ([`KvValues::KeyPrefix`]).
    fn write_kv(
        &self,
        cache: &mut Self::KvLayer,
        k: &Self::Tensor,
        v: Option<&Self::Tensor>,
        step: &Self::Step,
    ) -> Result<()>;
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &Self::KvLayer,
        step: &Self::Step,
        params: &AttentionParams,
    ) -> Result<Self::Tensor>;

    /// Makes `step` ready for [`Backend::gather_context`] and [`Backend::attention_rows`]:
    /// the step's contexts cut into chunks of `chunk_positions` positions (`None`: one chunk;
    /// [`StepMeta::context_chunks`]), which a device backend uploads here, once per step,
    /// rather than inside a layer. Those two fail on a step not prepared this way.
    fn prepare_context(&self, step: &mut Self::Step, chunk_positions: Option<usize>) -> Result<()>;
    /// How many chunks [`Backend::prepare_context`] cut the step's contexts into (0 before it
    /// ran).
    fn context_chunks(&self, step: &Self::Step) -> usize;
    /// Chunk `chunk`'s cached positions of the step's sequences, one sequence after another:
    /// `[chunk rows, kv_heads · k_dim]`, the keys (for a [`KvValues::KeyPrefix`] cache, whose
    /// values are their prefix, everything it holds).
    fn gather_context(
        &self,
        cache: &Self::KvLayer,
        step: &Self::Step,
        chunk: usize,
    ) -> Result<Self::Tensor>;
    /// Causal attention of the step's queries (`[T, num_heads · qk_dim]`) over the keys and
    /// values of one chunk, given as rows laid out as [`Backend::gather_context`] returns them,
    /// `num_kv_heads` heads each: over a single chunk, what [`Backend::attention`] computes over
    /// a cache holding them; over one of several, its part ([`Backend::merge_attention`]).
    fn attention_rows(
        &self,
        q: &Self::Tensor,
        kv: KvRows<'_, Self>,
        step: &Self::Step,
        params: &AttentionParams,
    ) -> Result<AttentionPart<Self::Tensor>>;
    /// Folds `part` into `acc`, two parts of one attention over disjoint keys: afterwards `acc`
    /// is the attention over both keys, output and log-sum-exp.
    fn merge_attention(
        &self,
        acc: &mut AttentionPart<Self::Tensor>,
        part: &AttentionPart<Self::Tensor>,
    ) -> Result<()>;

    // --- mixture of experts --------------------------------------------------------------------
    /// Routes tokens given router logits `[T, num_experts]` and an optional per-expert
    /// selection bias (DeepSeek-V3's `e_score_correction_bias`).
    fn route(
        &self,
        logits: &Self::Tensor,
        params: &RouterParams,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Routing>;
    /// Tokens routed to each expert in this step (length `num_experts`).
    fn expert_counts(&self, routing: &Self::Routing, num_experts: usize) -> Result<Vec<u32>>;
    /// Tokens routed to each expert by each of `routings` (a step's MoE layers over `step`),
    /// written into `counts` (`[routings, num_experts]`, exact up to 2^24 per entry) without
    /// moving it, so that a device counts inside a graph and copies every layer's counts to the
    /// host at once. Padding rows of a shaped step count towards no expert.
    fn expert_counts_into(
        &self,
        routings: &[&Self::Routing],
        step: &Self::Step,
        counts: &mut Self::Tensor,
    ) -> Result<()>;
    /// `Σ_e weight(t,e) · expert_e(x_t)` over the routed experts present in `experts` (an expert
    /// owned by another rank is `None` and contributes nothing here).
    fn moe(
        &self,
        x: &Self::Tensor,
        routing: &Self::Routing,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<Self::Tensor>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_shapes_are_checked_once_for_every_backend() {
        assert_eq!(concat_heads_widths((3, 8), (3, 4), 4).unwrap(), (2, 1));
        for (a, b, heads) in [
            ((3, 8), (2, 4), 4),
            ((3, 8), (3, 5), 4),
            ((3, 8), (3, 4), 0),
        ] {
            let e = concat_heads_widths(a, b, heads).unwrap_err().to_string();
            assert!(e.contains("concat_heads") && e.contains("heads"), "{e}");
        }
        // 4 heads of 16 inputs, 3 outputs each: a [12, 16] weight over 64 columns.
        assert_eq!(head_linear_width(64, &[12, 16], 4).unwrap(), 3);
        for (cols, shape, heads) in [
            (60, &[12, 16][..], 4),
            (64, &[13, 16], 4),
            (64, &[12, 16], 0),
        ] {
            let e = head_linear_width(cols, shape, heads)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{cols} columns")), "{e}");
        }
        let e = head_linear_width(64, &[12], 4).unwrap_err().to_string();
        assert!(e.contains("2-D"), "{e}");
    }
}

//! The CPU backend: the portable reference implementation of [`Backend`], multithreaded with rayon.
//!
//! Activations are plain `Vec<f32>` matrices; weights stay in their stored dtype (usually borrowed
//! from the memory-mapped checkpoint) and are widened row by row inside the kernels.

mod attention;
mod context;
mod head_linear;
mod linear;
pub mod memory;
mod moe;
pub(crate) mod ops;
mod pool;
pub mod probe;
pub mod profile;
mod scratch;
mod simd_x86;

pub use attention::CpuKv;
pub use moe::CpuRouting;

use std::ops::Range;

use crate::context::{chunk_of, merge_rows};
use crate::{
    AttentionParams, AttentionPart, Backend, BackendError, ExpertWeights, HostTensor, KvRows,
    KvSpec, Result, RopeApply, RopeLayout, RopeTable, RouterParams, StepMeta,
};

/// The matrix kernels this process runs (chosen once, at first use).
pub fn kernels_name() -> &'static str {
    linear::Isa::best().name()
}

/// `ln Σ e^x` over `xs` (numerically safe), with vectorised exponentials where the CPU has them:
/// the normaliser of a log-softmax over a vocabulary.
pub fn log_sum_exp(xs: &[f32]) -> f32 {
    linear::log_sum_exp(linear::Isa::best(), xs)
}

/// Threads in the compute pool (rayon's global pool: the logical CPUs, or `RAYON_NUM_THREADS`).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// A row-major `[rows, cols]` f32 matrix. Its buffer goes back to a pool when it is dropped, for
/// the next operation's output ([`pool`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.data));
    }
}

/// A weight in its stored dtype; 1-D weights (norms, biases) are also kept widened to f32.
pub struct CpuWeight {
    host: HostTensor,
    small: Option<Vec<f32>>,
}

impl CpuWeight {
    pub fn host(&self) -> &HostTensor {
        &self.host
    }

    fn vector(&self, op: &'static str) -> Result<&[f32]> {
        self.small.as_deref().ok_or_else(|| {
            BackendError::shape(
                op,
                format!("expected a 1-D weight, got {:?}", self.host.shape()),
            )
        })
    }

    fn matrix(&self, op: &'static str) -> Result<(usize, usize)> {
        match *self.host.shape() {
            [r, c] => Ok((r, c)),
            ref s => Err(BackendError::shape(
                op,
                format!("expected a 2-D weight, got {s:?}"),
            )),
        }
    }
}

/// Per-step metadata: the host description plus the RoPE angles of every new token.
pub struct CpuStep {
    meta: StepMeta,
    cos: Vec<f32>,
    sin: Vec<f32>,
    layout: RopeLayout,
    rot_dim: usize,
    /// Set by [`Backend::prepare_context`]: the chunks of the step's contexts.
    context: Vec<crate::ContextLayout>,
}

/// The CPU backend. Threads come from rayon's global pool (sized to the cores).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

fn same_shape(op: &'static str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(BackendError::shape(
            op,
            format!("{}x{} vs {}x{}", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    Ok(())
}

fn tensor(data: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
    CpuTensor { data, rows, cols }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Step = CpuStep;
    type KvLayer = CpuKv;
    type Routing = CpuRouting;
    type Graph = crate::NoGraph;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_weight(&self, w: HostTensor) -> Result<CpuWeight> {
        let small = (w.shape().len() == 1).then(|| w.to_f32_vec());
        Ok(CpuWeight { host: w, small })
    }

    fn weight_shape<'a>(&self, w: &'a CpuWeight) -> &'a [usize] {
        w.host.shape()
    }

    fn tensor_from_host(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(BackendError::shape(
                "tensor_from_host",
                format!("{} values for {rows}x{cols}", data.len()),
            ));
        }
        Ok(tensor(data, rows, cols))
    }

    fn tensor_to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        let _p = profile::scope("tensor_to_host", String::new);
        Ok(t.data.clone())
    }

    fn dims(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn prepare_step(&self, meta: &StepMeta, rope: &RopeTable) -> Result<CpuStep> {
        let _p = profile::scope("prepare_step", String::new);
        meta.validate("prepare_step")?;
        let (cos, sin) =
            ops::rope_angles(&meta.positions(), &rope.inv_freq, rope.attention_scaling);
        Ok(CpuStep {
            meta: meta.clone(),
            cos,
            sin,
            layout: rope.layout,
            rot_dim: rope.rot_dim(),
            context: Vec::new(),
        })
    }

    fn copy_into(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
        crate::backend::check_copy_into((dst.rows, dst.cols), (src.rows, src.cols))?;
        dst.data[..src.data.len()].copy_from_slice(&src.data);
        Ok(())
    }

    fn pack_into(&self, dst: &mut CpuTensor, offset: usize, src: &CpuTensor) -> Result<()> {
        crate::backend::check_pack_into(dst.data.len(), offset, src.data.len())?;
        dst.data[offset..offset + src.data.len()].copy_from_slice(&src.data);
        Ok(())
    }

    fn embedding(&self, table: &CpuWeight, step: &CpuStep) -> Result<CpuTensor> {
        let _p = profile::scope("embedding", String::new);
        let ids = &step.meta.tokens;
        let (vocab, hidden) = table.matrix("embedding")?;
        let view = table.host.view();
        let mut out = pool::zeroed(ids.len() * hidden);
        for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            if id as usize >= vocab {
                return Err(BackendError::invalid(
                    "embedding",
                    format!("token id {id} outside vocabulary of {vocab}"),
                ));
            }
            view.convert_into(id as usize * hidden, row);
        }
        Ok(tensor(out, ids.len(), hidden))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor> {
        let _p = profile::scope("linear", || format!("{:?} t{}", w.host.shape(), x.rows));
        let (n, k) = w.matrix("linear")?;
        if x.cols != k {
            return Err(BackendError::shape(
                "linear",
                format!("x has {} columns, weight {:?}", x.cols, w.host.shape()),
            ));
        }
        let b = bias.map(|b| b.vector("linear bias")).transpose()?;
        if let Some(b) = b
            && b.len() != n
        {
            return Err(BackendError::shape(
                "linear",
                format!("bias of {} for {n} outputs", b.len()),
            ));
        }
        Ok(tensor(
            linear::linear(&x.data, k, w.host.view(), n, b),
            x.rows,
            n,
        ))
    }

    fn linear_rows(&self, x: &CpuTensor, w: &CpuWeight, rows: Range<usize>) -> Result<CpuTensor> {
        let _p = profile::scope("linear_rows", || {
            format!("{:?} {rows:?} t{}", w.host.shape(), x.rows)
        });
        let (n, k) = w.matrix("linear_rows")?;
        crate::backend::check_weight_rows(&rows, n)?;
        if x.cols != k {
            return Err(BackendError::shape(
                "linear_rows",
                format!("x has {} columns, weight {:?}", x.cols, w.host.shape()),
            ));
        }
        let view = w.host.view().slice(rows.start * k..rows.end * k);
        Ok(tensor(
            linear::linear(&x.data, k, view, rows.len(), None),
            x.rows,
            rows.len(),
        ))
    }

    fn linear_many(
        &self,
        x: &CpuTensor,
        layers: &[(&CpuWeight, Option<&CpuWeight>)],
    ) -> Result<Vec<CpuTensor>> {
        let _p = profile::scope("linear_many", || {
            let shapes: Vec<_> = layers.iter().map(|(w, _)| w.host.shape()).collect();
            format!("{shapes:?} t{}", x.rows)
        });
        let mut projs = Vec::with_capacity(layers.len());
        for (w, bias) in layers {
            let (n, k) = w.matrix("linear_many")?;
            if x.cols != k {
                return Err(BackendError::shape(
                    "linear_many",
                    format!("x has {} columns, weight {:?}", x.cols, w.host.shape()),
                ));
            }
            let bias = bias.map(|b| b.vector("linear_many bias")).transpose()?;
            if let Some(b) = bias
                && b.len() != n
            {
                return Err(BackendError::shape(
                    "linear_many",
                    format!("bias of {} for {n} outputs", b.len()),
                ));
            }
            projs.push(linear::Proj {
                w: w.host.view(),
                n,
                bias,
            });
        }
        let outs = linear::linear_many(linear::Isa::best(), &x.data, x.cols, &projs);
        Ok(outs
            .into_iter()
            .zip(&projs)
            .map(|(y, p)| tensor(y, x.rows, p.n))
            .collect())
    }

    fn mlp(&self, x: &CpuTensor, w: &ExpertWeights<'_, Self>) -> Result<CpuTensor> {
        let _p = profile::scope("mlp", || format!("{:?} t{}", w.gate.host.shape(), x.rows));
        let e = moe::CpuExpert {
            gate: &w.gate.host,
            up: &w.up.host,
            down: &w.down.host,
        };
        Ok(tensor(moe::mlp(&x.data, x.cols, &e)?, x.rows, x.cols))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        let _p = profile::scope("rms_norm", String::new);
        let wv = w.vector("rms_norm")?;
        if wv.is_empty() || !x.cols.is_multiple_of(wv.len()) {
            return Err(BackendError::shape(
                "rms_norm",
                format!("{} columns, weight of {}", x.cols, wv.len()),
            ));
        }
        Ok(tensor(ops::rms_norm(&x.data, wv, eps), x.rows, x.cols))
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        let _p = profile::scope("add", String::new);
        same_shape("add_assign", x, y)?;
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        let _p = profile::scope("silu_mul", String::new);
        same_shape("silu_mul", gate, up)?;
        Ok(tensor(
            ops::silu_mul(&gate.data, &up.data),
            gate.rows,
            gate.cols,
        ))
    }

    fn mul_sigmoid_rows(&self, x: &mut CpuTensor, g: &CpuTensor) -> Result<()> {
        if g.rows != x.rows || g.cols != 1 {
            return Err(BackendError::shape(
                "mul_sigmoid_rows",
                format!("gate {}x{} for {} rows", g.rows, g.cols, x.rows),
            ));
        }
        for (row, gv) in x.data.chunks_exact_mut(x.cols.max(1)).zip(&g.data) {
            let s = ops::sigmoid(*gv);
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }

    fn narrow_cols(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        if start + len > x.cols {
            return Err(BackendError::shape(
                "narrow_cols",
                format!("{start}+{len} of {} columns", x.cols),
            ));
        }
        let data = x
            .data
            .chunks_exact(x.cols)
            .flat_map(|r| &r[start..start + len])
            .copied()
            .collect();
        Ok(tensor(data, x.rows, len))
    }

    fn narrow_rows(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        crate::backend::check_narrow_rows(x.rows, start, len)?;
        let range = start * x.cols..(start + len) * x.cols;
        Ok(tensor(x.data[range].to_vec(), len, x.cols))
    }

    fn write_cols(&self, dst: &mut CpuTensor, start: usize, src: &CpuTensor) -> Result<()> {
        crate::backend::check_write_cols((dst.rows, dst.cols), start, (src.rows, src.cols))?;
        if src.cols == 0 {
            return Ok(());
        }
        for (d, s) in dst
            .data
            .chunks_exact_mut(dst.cols)
            .zip(src.data.chunks_exact(src.cols))
        {
            d[start..start + src.cols].copy_from_slice(s);
        }
        Ok(())
    }

    fn split_heads(&self, x: &CpuTensor, heads: usize, a: usize) -> Result<(CpuTensor, CpuTensor)> {
        if heads == 0 || !x.cols.is_multiple_of(heads) || x.cols / heads < a {
            return Err(BackendError::shape(
                "split_heads",
                format!("{} columns into {heads} heads at {a}", x.cols),
            ));
        }
        let b = x.cols / heads - a;
        let (xa, xb) = ops::split_heads(&x.data, heads, a, b);
        Ok((tensor(xa, x.rows, heads * a), tensor(xb, x.rows, heads * b)))
    }

    fn concat_heads(&self, a: &CpuTensor, b: &CpuTensor, heads: usize) -> Result<CpuTensor> {
        let (da, db) =
            crate::backend::concat_heads_widths((a.rows, a.cols), (b.rows, b.cols), heads)?;
        let data = ops::concat_heads(&a.data, da, &b.data, db);
        Ok(tensor(data, a.rows, a.cols + b.cols))
    }

    fn concat_heads_shared(
        &self,
        a: &CpuTensor,
        shared: &CpuTensor,
        heads: usize,
    ) -> Result<CpuTensor> {
        let (da, ds) = crate::backend::concat_shared_widths(
            (a.rows, a.cols),
            (shared.rows, shared.cols),
            heads,
        )?;
        let data = ops::concat_shared(&a.data, &shared.data, a.rows, (heads, da, ds));
        Ok(tensor(data, a.rows, a.cols + heads * ds))
    }

    fn head_linear(&self, x: &CpuTensor, w: &CpuWeight, heads: usize) -> Result<CpuTensor> {
        let _p = profile::scope("head_linear", || {
            format!("{:?} t{}", w.host.shape(), x.rows)
        });
        let n = crate::backend::head_linear_width(x.cols, w.host.shape(), heads)?;
        let k = x.cols / heads;
        let y =
            head_linear::head_linear(&x.data, w.host.view(), head_linear::Heads { heads, k, n });
        Ok(tensor(y, x.rows, heads * n))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let _p = profile::scope("gather_rows", String::new);
        let mut data = pool::zeroed(rows.len() * x.cols);
        for (out, &r) in data.chunks_exact_mut(x.cols.max(1)).zip(rows) {
            if r >= x.rows {
                return Err(BackendError::invalid(
                    "gather_rows",
                    format!("row {r} of {}", x.rows),
                ));
            }
            out.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(tensor(data, rows.len(), x.cols))
    }

    fn rope(&self, x: &mut CpuTensor, step: &CpuStep, at: RopeApply) -> Result<()> {
        let _p = profile::scope("rope", String::new);
        let need = (at.num_heads.max(1) - 1) * at.head_stride + at.offset + step.rot_dim;
        if x.rows != step.meta.num_tokens() || need > x.cols {
            return Err(BackendError::shape(
                "rope",
                format!(
                    "{}x{} for {at:?} and rot_dim {}",
                    x.rows, x.cols, step.rot_dim
                ),
            ));
        }
        ops::rope(&mut x.data, x.cols, &step.cos, &step.sin, step.layout, at);
        Ok(())
    }

    fn alloc_kv(&self, spec: KvSpec) -> Result<CpuKv> {
        CpuKv::new(spec)
    }

    fn kv_memory_available(&self) -> Option<u64> {
        memory::available()
    }

    fn write_kv(
        &self,
        cache: &mut CpuKv,
        k: &CpuTensor,
        v: Option<&CpuTensor>,
        step: &CpuStep,
    ) -> Result<()> {
        let _p = profile::scope("write_kv", String::new);
        attention::write_kv(cache, k, v, &step.meta)
    }

    fn attention(
        &self,
        q: &CpuTensor,
        cache: &CpuKv,
        step: &CpuStep,
        params: &AttentionParams,
    ) -> Result<CpuTensor> {
        let _p = profile::scope("attention", String::new);
        let (out, _) = attention::attention(&q.data, cache, (&step.meta, 0..usize::MAX), params)?;
        Ok(tensor(out, q.rows, params.num_heads * params.v_dim))
    }

    fn prepare_context(&self, step: &mut CpuStep, chunk_positions: Option<usize>) -> Result<()> {
        step.context = step
            .meta
            .context_chunks("prepare_context", chunk_positions)?;
        Ok(())
    }

    fn context_chunks(&self, step: &CpuStep) -> usize {
        step.context.len()
    }

    fn gather_context(&self, cache: &CpuKv, step: &CpuStep, chunk: usize) -> Result<CpuTensor> {
        let _p = profile::scope("gather_context", String::new);
        context::gather(cache, chunk_of("gather_context", &step.context, chunk)?)
    }

    fn attention_rows(
        &self,
        q: &CpuTensor,
        kv: KvRows<'_, Self>,
        step: &CpuStep,
        params: &AttentionParams,
    ) -> Result<AttentionPart<CpuTensor>> {
        let _p = profile::scope("attention_rows", String::new);
        let layout = chunk_of("attention_rows", &step.context, kv.chunk)?;
        crate::check_attention_rows(
            (q.rows, q.cols),
            ((kv.k.rows, kv.k.cols), (kv.v.rows, kv.v.cols)),
            (step.meta.num_tokens(), layout.rows),
            params,
        )?;
        let (out, lse) = context::attend_rows(q, (kv.k, kv.v), layout, params)?;
        Ok(AttentionPart {
            out: tensor(out, q.rows, params.num_heads * params.v_dim),
            lse: tensor(lse, q.rows, params.num_heads),
        })
    }

    fn merge_attention(
        &self,
        acc: &mut AttentionPart<CpuTensor>,
        part: &AttentionPart<CpuTensor>,
    ) -> Result<()> {
        let v_dim = crate::check_merge(self, acc, part)?;
        let AttentionPart { out, lse } = acc;
        merge_rows(
            (&mut out.data, &mut lse.data),
            (&part.out.data, &part.lse.data),
            v_dim,
        );
        Ok(())
    }

    fn route(
        &self,
        logits: &CpuTensor,
        params: &RouterParams,
        bias: Option<&CpuWeight>,
    ) -> Result<CpuRouting> {
        let _p = profile::scope("route", String::new);
        let b = bias.map(|b| b.vector("route bias")).transpose()?;
        moe::route(&logits.data, params, b)
    }

    fn expert_counts(&self, routing: &CpuRouting, num_experts: usize) -> Result<Vec<u32>> {
        Ok(moe::expert_counts(routing, num_experts))
    }

    fn expert_counts_into(
        &self,
        routings: &[&CpuRouting],
        _step: &CpuStep,
        counts: &mut CpuTensor,
    ) -> Result<()> {
        let experts = counts.cols;
        crate::backend::check_counts_rows(
            "expert_counts_into",
            routings.len(),
            (counts.rows, counts.cols),
        )?;
        // A CPU step is never padded: every row counts.
        for (r, row) in routings
            .iter()
            .zip(counts.data.chunks_exact_mut(experts.max(1)))
        {
            for (c, n) in row.iter_mut().zip(moe::expert_counts(r, experts)) {
                *c = n as f32;
            }
        }
        Ok(())
    }

    fn moe(
        &self,
        x: &CpuTensor,
        routing: &CpuRouting,
        experts: &[Option<ExpertWeights<'_, Self>>],
    ) -> Result<CpuTensor> {
        let _p = profile::scope("moe", || format!("t{}", x.rows));
        let cpu: Vec<_> = experts
            .iter()
            .map(|e| {
                e.as_ref().map(|e| moe::CpuExpert {
                    gate: &e.gate.host,
                    up: &e.up.host,
                    down: &e.down.host,
                })
            })
            .collect();
        Ok(tensor(
            moe::moe(&x.data, x.cols, routing, &cpu)?,
            x.rows,
            x.cols,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn bf16_weight(n: usize, k: usize) -> HostTensor {
        let bytes: Vec<u8> = (0..n * k)
            .flat_map(|i| half::bf16::from_f32(((i * 37 % 23) as f32 - 11.0) / 8.0).to_le_bytes())
            .collect();
        HostTensor::from_bytes(&bytes, DType::BF16, vec![n, k]).unwrap()
    }

    #[test]
    fn linear_rows_are_the_columns_of_the_whole_product() {
        let b = CpuBackend;
        let (n, k, t) = (24, 40, 5);
        let w = b.upload_weight(bf16_weight(n, k)).unwrap();
        let xs: Vec<f32> = (0..t * k)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let x = b.tensor_from_host(xs, t, k).unwrap();
        let whole = b.linear(&x, &w, None).unwrap();
        for rows in [0..n, 6..13, 23..24, 9..9] {
            let part = b.linear_rows(&x, &w, rows.clone()).unwrap();
            assert_eq!(b.dims(&part), (t, rows.len()));
            let want = b.narrow_cols(&whole, rows.start, rows.len()).unwrap();
            assert_eq!(part.data, want.data, "rows {rows:?}");
        }
        let err = b.linear_rows(&x, &w, 20..25).unwrap_err().to_string();
        assert!(
            err.contains("rows 20..25 of a weight with 24 rows"),
            "{err}"
        );
        let narrow = b.tensor_from_host(vec![0.0; t * 3], t, 3).unwrap();
        let err = b.linear_rows(&narrow, &w, 0..4).unwrap_err().to_string();
        assert!(err.contains("x has 3 columns"), "{err}");
    }

    #[test]
    fn write_cols_undoes_narrow_cols_and_rows_narrow() {
        let b = CpuBackend;
        let x = b
            .tensor_from_host((0..24).map(|v| v as f32).collect(), 3, 8)
            .unwrap();
        let mut y = b.zeros(3, 8).unwrap();
        for (start, len) in [(0, 3), (3, 4), (7, 1)] {
            b.write_cols(&mut y, start, &b.narrow_cols(&x, start, len).unwrap())
                .unwrap();
        }
        assert_eq!(y.data, x.data);
        let part = b.narrow_cols(&x, 0, 3).unwrap();
        let err = b.write_cols(&mut y, 6, &part).unwrap_err().to_string();
        assert!(err.contains("3x3 at column 6 of 3x8"), "{err}");
        let short = b.zeros(2, 3).unwrap();
        assert!(b.write_cols(&mut y, 0, &short).is_err());
        let rows = b.narrow_rows(&x, 1, 2).unwrap();
        assert_eq!((rows.rows, rows.cols), (2, 8));
        assert_eq!(rows.data, x.data[8..24]);
        assert_eq!(b.narrow_rows(&x, 3, 0).unwrap().rows, 0);
        let err = b.narrow_rows(&x, 2, 2).unwrap_err().to_string();
        assert!(err.contains("rows 2+2 of 3"), "{err}");
    }
}

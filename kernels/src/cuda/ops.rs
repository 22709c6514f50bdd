//! Dense operations on the GPU: embedding, the cuBLAS linear layer, RMSNorm, RoPE and the
//! elementwise and reshuffling kernels of `kernels/cuda/ops.cu`.

use std::ffi::c_int;
use std::ops::Range;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};

use super::device::{CudaBackend, CudaTensor, CudaWeight, WeightData, grid_1d, grid_rows, to_u32};
use super::step::CudaStep;
use crate::{BackendError, DType, Result, RopeApply, RopeLayout, RowSummary};

/// Scalars of the `rope` kernel; the same fields in the same order as `RopeArgs` in ops.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeArgs {
    rows: u32,
    cols: u32,
    half: u32,
    num_heads: u32,
    head_stride: u32,
    offset: u32,
    interleaved: u32,
}

// SAFETY: `RopeArgs` is `repr(C)` with only `u32` fields, the layout of the C struct the kernel
// declares, and is passed by value.
unsafe impl DeviceRepr for RopeArgs {}

/// dtype numbers of prelude.cu (`DT_F32`, `DT_F16`, `DT_BF16`).
fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// One matrix product per head for cuBLAS: `y[tokens, heads·n]` with head `h` = `x_h · w_hᵀ`, where `x_h` is columns `h·k ..` of
/// `x[tokens, heads·k]` and `w_h` rows `h·n ..` of `w[heads·n, k]`. One head is a plain linear
/// layer, and may start at row `w_row` of `w` (a range of its output rows, read in place).
#[derive(Clone, Copy)]
struct GemmShape {
    tokens: usize,
    n: usize,
    k: usize,
    heads: usize,
    w_row: usize,
}

/// A [`GemmShape`] with its operands' device addresses and element type.
struct Gemm {
    shape: GemmShape,
    w: u64,
    x: u64,
    y: u64,
    ab_type: blas_sys::cudaDataType,
}

fn same_shape(op: &'static str, a: &CudaTensor, b: &CudaTensor) -> Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(BackendError::shape(
            op,
            format!("{}x{} vs {}x{}", a.rows, a.cols, b.rows, b.cols),
        ));
    }
    Ok(())
}

fn cint(op: &'static str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| BackendError::invalid(op, format!("{v} exceeds a C int")))
}

impl RopeArgs {
    /// The kernel arguments of RoPE at `at` over `x` for `step` (shared by rope and norm_rope).
    fn new(op: &'static str, x: &CudaTensor, step: &CudaStep, at: RopeApply) -> Result<Self> {
        Ok(RopeArgs {
            rows: to_u32(op, x.rows)?,
            cols: to_u32(op, x.cols)?,
            half: to_u32(op, step.half)?,
            num_heads: to_u32(op, at.num_heads)?,
            head_stride: to_u32(op, at.head_stride)?,
            offset: to_u32(op, at.offset)?,
            interleaved: u32::from(step.layout == RopeLayout::Interleaved),
        })
    }
}

impl CudaBackend {
    pub(super) fn embedding_impl(&self, table: &CudaWeight, step: &CudaStep) -> Result<CudaTensor> {
        const OP: &str = "embedding";
        let (vocab, hidden) = table.matrix(OP)?;
        if let Some(&id) = step.meta.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(BackendError::invalid(
                OP,
                format!("token id {id} outside vocabulary of {vocab}"),
            ));
        }
        let rows = step.rows;
        let mut out = self.output(OP, rows, hidden)?;
        if rows == 0 || hidden == 0 {
            return Ok(out);
        }
        let (hidden32, vocab32) = (to_u32(OP, hidden)?, to_u32(OP, vocab)?);
        let ids = step.ids();
        let mut b = self.stream.launch_builder(self.func(OP)?);
        match &table.data {
            WeightData::F32(w) => b.arg(&mut out.data).arg(w),
            WeightData::Half { bits, .. } => b.arg(&mut out.data).arg(bits),
        };
        let code = dtype_code(weight_dtype(table));
        b.arg(&ids).arg(&code).arg(&hidden32).arg(&vocab32);
        // SAFETY: embedding(float* out, const void* table, const u32* ids, int dtype, u32 hidden,
        // u32 vocab): out holds rows*hidden floats and ids the step's rows ids (step.rs); the
        // table holds vocab*hidden elements of the dtype passed, and the kernel reads a row only
        // for an id below vocab (the step's own ids were also checked above).
        unsafe { b.launch(grid_rows(rows, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    /// `x` rounded to the 16-bit type of a weight, for a tensor-core product.
    fn to_half(&self, x: &CudaTensor, dtype: DType) -> Result<CudaSlice<u16>> {
        const OP: &str = "linear (to_half)";
        let n = x.rows * x.cols;
        let mut out = self.uninit::<u16>(OP, n)?;
        let (n32, code) = (to_u32(OP, n)?, dtype_code(dtype));
        let mut b = self.stream.launch_builder(self.func("to_half")?);
        b.arg(&mut out).arg(&x.data).arg(&n32).arg(&code);
        // SAFETY: to_half(u16* out, const float* x, u32 n, int dtype): both buffers hold n
        // elements and threads past n return.
        unsafe { b.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    fn gemm(&self, g: Gemm) -> Result<()> {
        const OP: &str = "linear (cublasGemmEx)";
        let s = g.shape;
        let (m, n, k) = (cint(OP, s.n)?, cint(OP, s.tokens)?, cint(OP, s.k)?);
        let (ldb, ldc) = (cint(OP, s.heads * s.k)?, cint(OP, s.heads * s.n)?);
        self.counted();
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.ctx
            .bind_to_thread()
            .map_err(|e| BackendError::device(OP, e))?;
        let (op_t, op_n) = (
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
        );
        let (c_type, compute, algo) = (
            blas_sys::cudaDataType::CUDA_R_32F,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        );
        let (alpha, beta) = ((&alpha as *const f32).cast(), (&beta as *const f32).cast());
        // cuBLAS is column-major: y[tokens, n] row-major is yᵀ[n, tokens] column-major, so the
        // call computes yᵀ = W · xᵀ with W read transposed from its row-major [n, k] storage.
        // With several heads, head h's xᵀ starts h·k elements in with columns heads·k apart, its
        // W h·n·k elements in, and its yᵀ h·n elements in with columns heads·n apart.
        let result = if s.heads == 1 {
            // SAFETY: the handle is bound to this backend's stream and context (bound above); w
            // holds n*k elements of `ab_type` from its row w_row (lda = k; linear_impl checked
            // w_row + n against the weight's rows), x holds tokens*k elements of the same
            // type (ldb = k), y holds tokens*n f32 (ldc = n); alpha and beta are host f32
            // scalars, as CUBLAS_COMPUTE_32F with the default host pointer mode requires, and
            // outlive the call.
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    op_t,
                    op_n,
                    m,
                    n,
                    k,
                    alpha,
                    g.w as *const _,
                    g.ab_type,
                    k,
                    g.x as *const _,
                    g.ab_type,
                    ldb,
                    beta,
                    g.y as *mut _,
                    c_type,
                    ldc,
                    compute,
                    algo,
                )
            }
        } else {
            let heads = cint(OP, s.heads)?;
            let stride_w = (s.n * s.k) as i64;
            // SAFETY: as for one head, per head h < heads: w holds heads*n*k elements (head h's
            // n*k from h*n*k, lda = k), x holds tokens*heads*k (head h's columns from h*k,
            // ldb = heads*k) and y tokens*heads*n f32 (from h*n, ldc = heads*n), so every
            // head's operands lie inside their buffers.
            unsafe {
                blas::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    op_t,
                    op_n,
                    m,
                    n,
                    k,
                    alpha,
                    g.w as *const _,
                    g.ab_type,
                    k,
                    stride_w,
                    g.x as *const _,
                    g.ab_type,
                    ldb,
                    s.k as i64,
                    beta,
                    g.y as *mut _,
                    c_type,
                    ldc,
                    s.n as i64,
                    heads,
                    compute,
                    algo,
                )
            }
        };
        result.map_err(|e| BackendError::device(OP, e))
    }

    /// The product of `shape` with `x` and `w` as its operands, into a new `[tokens, heads·n]`
    /// tensor (zeros for an empty sum; otherwise cuBLAS writes every element, beta = 0): f32 weights take the activations as they are; 16-bit ones take them
    /// rounded to the weight's type on the device (the weights are never converted), since
    /// cuBLAS wants both factors in one type.
    fn product(
        &self,
        op: &'static str,
        x: &CudaTensor,
        w: &CudaWeight,
        shape: GemmShape,
    ) -> Result<CudaTensor> {
        let cols = shape.heads * shape.n;
        if shape.tokens == 0 || shape.n == 0 || shape.k == 0 {
            return self.tensor(op, shape.tokens, cols);
        }
        let mut y = self.output(op, shape.tokens, cols)?;
        self.product_into(x, w, &mut y, shape)?;
        Ok(y)
    }

    fn product_into(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        y: &mut CudaTensor,
        shape: GemmShape,
    ) -> Result<()> {
        let stream = self.stream.clone();
        let (yp, _yg) = y.data.device_ptr_mut(&stream);
        // Bytes from the weight's start to its row `w_row`.
        let skip = |elem: usize| (shape.w_row * shape.k * elem) as u64;
        match &w.data {
            WeightData::F32(wd) => {
                let (wp, _wg) = wd.device_ptr(&stream);
                let wp = wp + skip(4);
                let (xp, _xg) = x.data.device_ptr(&stream);
                self.gemm(Gemm {
                    shape,
                    w: wp,
                    x: xp,
                    y: yp,
                    ab_type: blas_sys::cudaDataType::CUDA_R_32F,
                })
            }
            WeightData::Half { dtype, bits } => {
                let xh = self.to_half(x, *dtype)?;
                let (wp, _wg) = bits.device_ptr(&stream);
                let wp = wp + skip(2);
                let (xp, _xg) = xh.device_ptr(&stream);
                let ab_type = if *dtype == DType::F16 {
                    blas_sys::cudaDataType::CUDA_R_16F
                } else {
                    blas_sys::cudaDataType::CUDA_R_16BF
                };
                self.gemm(Gemm {
                    shape,
                    w: wp,
                    x: xp,
                    y: yp,
                    ab_type,
                })
            }
        }
    }

    /// `x · W[rows]ᵀ (+ bias)`: `linear` over all of `W`'s rows, `linear_rows` over some.
    pub(super) fn linear_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        rows: Option<Range<usize>>,
    ) -> Result<CudaTensor> {
        let op = if rows.is_some() {
            "linear_rows"
        } else {
            "linear"
        };
        let (out, k) = w.matrix(op)?;
        let rows = rows.unwrap_or(0..out);
        crate::backend::check_weight_rows(&rows, out)?;
        let n = rows.len();
        if x.cols != k {
            return Err(BackendError::shape(
                op,
                format!("x has {} columns, weight {:?}", x.cols, w.shape),
            ));
        }
        let bias = bias
            .map(|b| b.vector("linear bias").map(|v| (b, v)))
            .transpose()?;
        if let Some((b, _)) = bias
            && b.shape[0] != n
        {
            return Err(BackendError::shape(
                op,
                format!("bias of {} for {n} outputs", b.shape[0]),
            ));
        }
        let shape = GemmShape {
            tokens: x.rows,
            n,
            k,
            heads: 1,
            w_row: rows.start,
        };
        let mut y = self.product(op, x, w, shape)?;
        // As before: an empty product returns its zeros without the bias.
        if let Some((_, bv)) = bias
            && x.rows > 0
            && n > 0
            && k > 0
        {
            let (rows, n32) = (to_u32(op, x.rows)?, to_u32(op, n)?);
            let mut b = self.stream.launch_builder(self.func("add_bias")?);
            b.arg(&mut y.data).arg(bv).arg(&rows).arg(&n32);
            // SAFETY: add_bias(float* y, const float* b, u32 rows, u32 n): y holds rows*n floats,
            // b holds n (checked above); threads past rows*n return.
            unsafe { b.launch(grid_1d(x.rows * n)) }.map_err(|e| BackendError::device(op, e))?;
        }
        Ok(y)
    }

    pub(super) fn head_linear_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        heads: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "head_linear";
        let n = crate::backend::head_linear_width(x.cols, &w.shape, heads)?;
        let shape = GemmShape {
            tokens: x.rows,
            n,
            k: x.cols / heads,
            heads,
            w_row: 0,
        };
        self.product(OP, x, w, shape)
    }

    /// The checks and the output shared by the norms: the weight's f32 values, the group width
    /// as a kernel argument, the number of groups (one block each) and the output tensor.
    fn norm_setup<'w>(
        &self,
        op: &'static str,
        x: &CudaTensor,
        w: &'w CudaWeight,
    ) -> Result<(&'w CudaSlice<f32>, u32, usize, CudaTensor)> {
        let wv = w.vector(op)?;
        let g = w.shape[0];
        if g == 0 || !x.cols.is_multiple_of(g) {
            return Err(BackendError::shape(
                op,
                format!("{} columns, weight of {g}", x.cols),
            ));
        }
        let out = self.output(op, x.rows, x.cols)?;
        Ok((wv, to_u32(op, g)?, x.rows * x.cols / g, out))
    }

    pub(super) fn rms_norm_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        const OP: &str = "rms_norm";
        let (wv, g32, groups, mut out) = self.norm_setup(OP, x, w)?;
        if groups == 0 {
            return Ok(out);
        }
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data)
            .arg(&x.data)
            .arg(wv)
            .arg(&g32)
            .arg(&eps);
        // SAFETY: rms_norm(float* out, const float* x, const float* w, u32 g, float eps): one
        // block (a multiple of 32 threads, as block_sum needs) per group of g columns; out and x
        // hold groups*g floats, w holds g.
        unsafe { b.launch(grid_rows(groups, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn add_rms_norm_impl(
        &self,
        x: &mut CudaTensor,
        y: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        const OP: &str = "add_rms_norm";
        same_shape(OP, x, y)?;
        let (wv, g32, groups, mut out) = self.norm_setup(OP, x, w)?;
        if groups == 0 {
            return Ok(out);
        }
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data)
            .arg(&mut x.data)
            .arg(&y.data)
            .arg(wv)
            .arg(&g32)
            .arg(&eps);
        // SAFETY: add_rms_norm(float* out, float* x, const float* y, const float* w, u32 g,
        // float eps): one block (a multiple of 32 threads, as block_sum needs) per group of g
        // columns; out, x and y hold groups*g floats (same shape, checked), w holds g; the three
        // are distinct buffers (out is new, x is borrowed mutably).
        unsafe { b.launch(grid_rows(groups, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn add_assign_impl(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        const OP: &str = "add_assign";
        same_shape(OP, x, y)?;
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        let n32 = to_u32(OP, n)?;
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut x.data).arg(&y.data).arg(&n32);
        // SAFETY: add_assign(float* x, const float* y, u32 n): both hold n floats (same shape,
        // checked); x and y are distinct buffers (one is borrowed mutably).
        unsafe { b.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }

    pub(super) fn silu_mul_impl(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        const OP: &str = "silu_mul";
        same_shape(OP, gate, up)?;
        let mut out = self.output(OP, gate.rows, gate.cols)?;
        let n = gate.rows * gate.cols;
        if n == 0 {
            return Ok(out);
        }
        let n32 = to_u32(OP, n)?;
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data).arg(&gate.data).arg(&up.data).arg(&n32);
        // SAFETY: silu_mul(float* out, const float* gate, const float* up, u32 n): all three
        // hold n floats; threads past n return.
        unsafe { b.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn mul_sigmoid_rows_impl(&self, x: &mut CudaTensor, g: &CudaTensor) -> Result<()> {
        const OP: &str = "mul_sigmoid_rows";
        if g.rows != x.rows || g.cols != 1 {
            return Err(BackendError::shape(
                OP,
                format!("gate {}x{} for {} rows", g.rows, g.cols, x.rows),
            ));
        }
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        let (rows, cols) = (to_u32(OP, x.rows)?, to_u32(OP, x.cols)?);
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut x.data).arg(&g.data).arg(&rows).arg(&cols);
        // SAFETY: mul_sigmoid_rows(float* x, const float* g, u32 rows, u32 cols): x holds
        // rows*cols floats, g holds rows; threads past rows*cols return.
        unsafe { b.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }

    pub(super) fn narrow_cols_impl(
        &self,
        x: &CudaTensor,
        start: usize,
        len: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "narrow_cols";
        if start + len > x.cols {
            return Err(BackendError::shape(
                OP,
                format!("{start}+{len} of {} columns", x.cols),
            ));
        }
        let mut out = self.output(OP, x.rows, len)?;
        if x.rows * len == 0 {
            return Ok(out);
        }
        let (rows, cols) = (to_u32(OP, x.rows)?, to_u32(OP, x.cols)?);
        let (start, len32) = (to_u32(OP, start)?, to_u32(OP, len)?);
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data).arg(&x.data);
        b.arg(&rows).arg(&cols).arg(&start).arg(&len32);
        // SAFETY: narrow_cols(float* out, const float* x, u32 rows, u32 cols, u32 start,
        // u32 len): out holds rows*len floats, x rows*cols, start+len <= cols (checked).
        unsafe { b.launch(grid_1d(x.rows * len)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn write_cols_impl(
        &self,
        dst: &mut CudaTensor,
        start: usize,
        src: &CudaTensor,
    ) -> Result<()> {
        const OP: &str = "write_cols";
        crate::backend::check_write_cols((dst.rows, dst.cols), start, (src.rows, src.cols))?;
        if src.rows * src.cols == 0 {
            return Ok(());
        }
        let (rows, cols) = (to_u32(OP, dst.rows)?, to_u32(OP, dst.cols)?);
        let (start, len) = (to_u32(OP, start)?, to_u32(OP, src.cols)?);
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut dst.data).arg(&src.data);
        b.arg(&rows).arg(&cols).arg(&start).arg(&len);
        // SAFETY: write_cols(float* out, const float* x, u32 rows, u32 cols, u32 start, u32 len):
        // out holds rows*cols floats, x rows*len, start+len <= cols (checked).
        unsafe { b.launch(grid_1d(src.rows * src.cols)) }
            .map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }

    pub(super) fn split_heads_impl(
        &self,
        x: &CudaTensor,
        heads: usize,
        a: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        const OP: &str = "split_heads";
        if heads == 0 || !x.cols.is_multiple_of(heads) || x.cols / heads < a {
            return Err(BackendError::shape(
                OP,
                format!("{} columns into {heads} heads at {a}", x.cols),
            ));
        }
        let b_w = x.cols / heads - a;
        let mut xa = self.output(OP, x.rows, heads * a)?;
        let mut xb = self.output(OP, x.rows, heads * b_w)?;
        if x.rows * x.cols == 0 {
            return Ok((xa, xb));
        }
        let (units, a32, b32) = (
            to_u32(OP, x.rows * heads)?,
            to_u32(OP, a)?,
            to_u32(OP, b_w)?,
        );
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut xa.data).arg(&mut xb.data).arg(&x.data);
        b.arg(&units).arg(&a32).arg(&b32);
        // SAFETY: split_heads(float* xa, float* xb, const float* x, u32 units, u32 a, u32 b):
        // x holds units*(a+b) floats, xa units*a and xb units*b (each at least one element).
        unsafe { b.launch(grid_1d(x.rows * x.cols)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok((xa, xb))
    }

    pub(super) fn concat_heads_impl(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        heads: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "concat_heads";
        let (da, db) =
            crate::backend::concat_heads_widths((a.rows, a.cols), (b.rows, b.cols), heads)?;
        let mut out = self.output(OP, a.rows, a.cols + b.cols)?;
        let n = a.rows * (a.cols + b.cols);
        if n == 0 {
            return Ok(out);
        }
        let (units, da32, db32) = (
            to_u32(OP, a.rows * heads)?,
            to_u32(OP, da)?,
            to_u32(OP, db)?,
        );
        to_u32(OP, n)?;
        let mut l = self.stream.launch_builder(self.func(OP)?);
        l.arg(&mut out.data).arg(&a.data).arg(&b.data);
        l.arg(&units).arg(&da32).arg(&db32);
        // SAFETY: concat_heads(float* out, const float* a, const float* b, u32 units, u32 da,
        // u32 db): out holds units*(da+db) floats, a units*da and b units*db (the shapes
        // checked above); threads past units*(da+db) return.
        unsafe { l.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn concat_heads_shared_impl(
        &self,
        a: &CudaTensor,
        shared: &CudaTensor,
        heads: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "concat_heads_shared";
        let (da, ds) = crate::backend::concat_shared_widths(
            (a.rows, a.cols),
            (shared.rows, shared.cols),
            heads,
        )?;
        let mut out = self.output(OP, a.rows, heads * (da + ds))?;
        let n = a.rows * heads * (da + ds);
        if n == 0 {
            return Ok(out);
        }
        to_u32(OP, n)?;
        let units = to_u32(OP, a.rows * heads)?;
        let [heads32, da32, ds32] = [heads, da, ds].map(|d| d as u32);
        let mut l = self.stream.launch_builder(self.func(OP)?);
        l.arg(&mut out.data).arg(&a.data).arg(&shared.data);
        l.arg(&units).arg(&heads32).arg(&da32).arg(&ds32);
        // SAFETY: concat_heads_shared(float* out, const float* a, const float* s, u32 units,
        // u32 heads, u32 da, u32 ds): out holds units*(da+ds) floats, a units*da and s
        // (units/heads)*ds (the shapes checked above; n fits u32, so each factor does); threads
        // past units*(da+ds) return.
        unsafe { l.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    /// Rows `rows` of `x` (already on the device and checked against `x.rows`).
    pub(super) fn gather_dev(
        &self,
        x: &CudaTensor,
        rows: &cudarc::driver::CudaView<'_, u32>,
        n: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "gather_rows";
        let mut out = self.output(OP, n, x.cols)?;
        if n == 0 || x.cols == 0 {
            return Ok(out);
        }
        let cols = to_u32(OP, x.cols)?;
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data).arg(&x.data).arg(rows).arg(&cols);
        // SAFETY: gather_rows(float* out, const float* x, const u32* rows, u32 cols): one block
        // per output row; rows holds n indices, each < x.rows (checked by the caller); out holds
        // n*cols floats.
        unsafe { b.launch(grid_rows(n, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn gather_rows_impl(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        const OP: &str = "gather_rows";
        if let Some(&r) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(BackendError::invalid(OP, format!("row {r} of {}", x.rows)));
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let dev = self.upload(OP, &idx)?;
        self.gather_dev(x, &dev.slice(..), rows.len())
    }

    pub(super) fn rope_impl(
        &self,
        x: &mut CudaTensor,
        step: &CudaStep,
        at: RopeApply,
    ) -> Result<()> {
        const OP: &str = "rope";
        let rot_dim = step.half * 2;
        let need = (at.num_heads.max(1) - 1) * at.head_stride + at.offset + rot_dim;
        if x.rows != step.rows || need > x.cols {
            return Err(BackendError::shape(
                OP,
                format!("{}x{} for {at:?} and rot_dim {rot_dim}", x.rows, x.cols),
            ));
        }
        let n = x.rows * at.num_heads * step.half;
        if n == 0 {
            return Ok(());
        }
        let args = RopeArgs::new(OP, x, step, at)?;
        let (cos, sin) = (step.cos(), step.sin());
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut x.data).arg(&cos).arg(&sin).arg(&args);
        // SAFETY: rope(float* x, const float* cos, const float* sin, RopeArgs a): x holds
        // rows*cols floats and every rotated element lies inside a row (`need <= cols`, checked);
        // cos and sin hold rows*half floats (built by prepare_step for these rows, as f32 bit
        // patterns: the kernel reads them as the floats they are).
        unsafe { b.launch(grid_1d(n)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(())
    }
}

impl CudaBackend {
    /// The fused norm and RoPE where each norm group is one whole head and the heads fill the
    /// rows (Qwen3's q and k); any other layout gets the two operations one after the other.
    pub(super) fn norm_rope_impl(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
        step: &CudaStep,
        at: RopeApply,
    ) -> Result<CudaTensor> {
        const OP: &str = "norm_rope";
        let fits = w.shape.len() == 1
            && w.shape[0] == at.head_stride
            && at.num_heads * at.head_stride == x.cols
            && at.offset + 2 * step.half <= at.head_stride;
        if !fits {
            let mut y = self.rms_norm_impl(x, w, eps)?;
            self.rope_impl(&mut y, step, at)?;
            return Ok(y);
        }
        let (wv, _, groups, mut out) = self.norm_setup(OP, x, w)?;
        if x.rows != step.rows {
            return Err(BackendError::shape(
                OP,
                format!("{} rows for a step of {} rows", x.rows, step.rows),
            ));
        }
        if groups == 0 {
            return Ok(out);
        }
        let args = RopeArgs::new(OP, x, step, at)?;
        let (cos, sin) = (step.cos(), step.sin());
        let mut b = self.stream.launch_builder(self.func(OP)?);
        b.arg(&mut out.data)
            .arg(&x.data)
            .arg(wv)
            .arg(&cos)
            .arg(&sin)
            .arg(&eps)
            .arg(&args);
        // SAFETY: norm_rope(float* out, const float* x, const float* w, const float* cos,
        // const float* sin, float eps, RopeArgs a): one block (a multiple of 32 threads, as
        // block_sum needs) per (token, head); x and out hold rows*num_heads*head_stride floats
        // (heads fill the rows, checked), w holds head_stride, every rotated element lies inside
        // its head (offset + rot_dim <= head_stride, checked); cos and sin hold rows*half floats
        // (built by prepare_step for these rows as f32 bit patterns, checked).
        unsafe { b.launch(grid_rows(groups, 128)) }.map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }

    pub(super) fn row_summaries_impl(
        &self,
        x: &CudaTensor,
        rows: usize,
    ) -> Result<Vec<RowSummary>> {
        let out = self.summarize_rows_impl(x, rows)?;
        let host = self.download("row_summaries", &out.data, out.rows * out.cols)?;
        Ok(RowSummary::unpack(&host))
    }

    /// `[rows, RowSummary::PACKED]` summaries of `x`'s first `rows` rows, on the device.
    pub(super) fn summarize_rows_impl(&self, x: &CudaTensor, rows: usize) -> Result<CudaTensor> {
        const OP: &str = "row_summaries";
        crate::backend::check_summary_rows(rows, (x.rows, x.cols))?;
        let width = RowSummary::PACKED;
        let mut out = self.uninit::<f32>(OP, width * rows)?;
        if rows > 0 {
            let cols = to_u32(OP, x.cols)?;
            let mut b = self.stream.launch_builder(self.func("row_argmax_lse")?);
            b.arg(&mut out).arg(&x.data).arg(&cols);
            // SAFETY: row_argmax_lse(float* out, const float* x, u32 cols): one block of 256
            // threads (a multiple of 32) per row for the first rows rows; x holds at least
            // rows*cols floats (rows <= x.rows, checked) and out 3*rows (RowSummary::PACKED = 3).
            unsafe { b.launch(grid_rows(rows, 256)) }.map_err(|e| BackendError::device(OP, e))?;
        }
        Ok(CudaTensor {
            data: out,
            rows,
            cols: width,
        })
    }
}

/// The stored dtype of a weight.
pub(super) fn weight_dtype(w: &CudaWeight) -> DType {
    match &w.data {
        WeightData::F32(_) => DType::F32,
        WeightData::Half { dtype, .. } => *dtype,
    }
}

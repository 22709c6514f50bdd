//! The CUDA device: opening it, compiling and loading the kernels, and the device-resident types.
//!
//! Kernels are compiled by NVRTC from the sources in `kernels/cuda/` (embedded with
//! `include_str!`) for the virtual architecture of the device (`compute_XY`); the driver turns the
//! PTX into machine code for the exact chip when the module is loaded. Compilation happens once per
//! process and architecture: the PTX is cached, and every later [`CudaBackend`] for a device of the
//! same architecture only loads it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::probe;
use crate::{BackendError, DType, HostTensor, Result, WeightView};

/// The kernel sources, in the order they are concatenated: `prelude.cu` first (shared helpers).
const SOURCES: [(&str, &str); 6] = [
    ("prelude.cu", include_str!("../../cuda/prelude.cu")),
    ("ops.cu", include_str!("../../cuda/ops.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("prefill.cu", include_str!("../../cuda/prefill.cu")),
    ("moe.cu", include_str!("../../cuda/moe.cu")),
    ("moe_mma.cu", include_str!("../../cuda/moe_mma.cu")),
];

/// Every `extern "C"` kernel of [`SOURCES`]; each is looked up once when the backend opens.
const KERNELS: [&str; 36] = [
    "embedding",
    "to_half",
    "add_bias",
    "rms_norm",
    "add_assign",
    "add_rms_norm",
    "silu_mul",
    "mul_sigmoid_rows",
    "narrow_cols",
    "write_cols",
    "split_heads",
    "concat_heads",
    "concat_heads_shared",
    "gather_rows",
    "row_argmax_lse",
    "scatter_add_rows",
    "rope",
    "norm_rope",
    "write_kv",
    "gather_kv_rows",
    "paged_attention",
    "paged_attention_split",
    "paged_attention_wide",
    "paged_attention_split_wide",
    "attention_combine",
    "merge_attention",
    "prefill_attention",
    "prefill_attention_wide",
    "route",
    "moe_plan",
    "moe_gate_up",
    "moe_down",
    "moe_combine",
    "moe_gate_up_mma",
    "moe_down_mma",
    "moe_count",
];

/// Device tables of expert weight addresses, keyed by the addresses they hold.
pub(super) type ExpertTables = Mutex<HashMap<Vec<u64>, Arc<CudaSlice<u64>>>>;

/// What the backend learnt about its device when it opened it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: (i32, i32),
    pub free_bytes: usize,
    pub total_bytes: usize,
    /// Streaming multiprocessors (132 on an H100 SXM): how many blocks run at once, roughly.
    pub multiprocessors: usize,
}

/// A row-major `[rows, cols]` f32 matrix in device memory.
pub struct CudaTensor {
    pub(super) data: CudaSlice<f32>,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

/// Device storage of a weight.
pub(super) enum WeightData {
    F32(CudaSlice<f32>),
    /// F16 or BF16 as raw 16-bit patterns (what the kernels and cuBLAS read).
    Half {
        dtype: DType,
        bits: CudaSlice<u16>,
    },
}

/// A weight in device memory: matrices keep their stored dtype (bf16 stays bf16, so a checkpoint
/// takes the same memory on the GPU as on disk); 1-D weights (norms, biases, router biases) are
/// widened to f32 once at upload, as the CPU backend does.
pub struct CudaWeight {
    pub(super) shape: Vec<usize>,
    pub(super) data: WeightData,
}

impl CudaWeight {
    /// The f32 elements of a 1-D weight.
    pub(super) fn vector(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match (&self.data, self.shape.len()) {
            (WeightData::F32(v), 1) => Ok(v),
            _ => Err(BackendError::shape(
                op,
                format!("expected a 1-D weight, got {:?}", self.shape),
            )),
        }
    }

    pub(super) fn matrix(&self, op: &'static str) -> Result<(usize, usize)> {
        match *self.shape {
            [r, c] => Ok((r, c)),
            ref s => Err(BackendError::shape(
                op,
                format!("expected a 2-D weight, got {s:?}"),
            )),
        }
    }
}

/// One CUDA device with its stream, cuBLAS handle and loaded kernels.
///
/// All work is queued on one stream, in call order, so operations see their inputs complete
/// without events; only copies to the host wait for the stream.
pub struct CudaBackend {
    pub(super) info: DeviceInfo,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    /// Every kernel, with how many times it was looked up to launch.
    kernels: HashMap<&'static str, (CudaFunction, AtomicU64)>,
    /// Per MoE layer, the device table of its experts' weight addresses (`moe_experts.rs`), keyed
    /// by those addresses, so that a steady-state step uploads nothing.
    pub(super) expert_tables: ExpertTables,
    /// Kernels and cuBLAS calls queued so far (see [`CudaBackend::launch_counter`]).
    launches: Arc<AtomicU64>,
    /// Whether prompt steps may take the tensor-core attention kernels (see
    /// [`CudaBackend::tensor_core_prefill`]); on by default.
    pub(super) tensor_core_prefill: Arc<AtomicBool>,
    /// Whether large MoE steps take the tensor-core grouped kernels (see
    /// [`CudaBackend::tensor_core_moe`]); on by default.
    pub(super) tensor_core_moe: Arc<AtomicBool>,
    // Declared last so that it is dropped after everything that lives in it.
    pub(super) ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn not_available(ordinal: usize, what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::CudaNotAvailable(format!("device {ordinal}: {what}: {e:?}"))
}

impl CudaBackend {
    /// Opens device `ordinal`: checks the libraries, creates the context and stream, compiles
    /// (or reuses) the kernels for its architecture and loads them. A machine with no driver, no
    /// device, or too few devices gets [`BackendError::CudaNotAvailable`].
    pub fn new(ordinal: usize) -> Result<Self> {
        probe::probe_libraries()?;
        // cudarc resolves each driver function on first use and panics if the installed driver
        // lacks it (a driver older than the CUDA 13.0 bindings); opening the device is where that
        // shows first, so a panic there is reported as "not available" rather than unwinding
        // through the caller.
        match std::panic::catch_unwind(|| Self::open(ordinal)) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(BackendError::CudaNotAvailable(format!(
                    "device {ordinal}: the CUDA libraries failed while opening it \
                     (driver older than the CUDA 13.0 bindings?): {msg}"
                )))
            }
        }
    }

    /// How many CUDA devices the driver sees; `CudaNotAvailable` without a driver.
    pub fn device_count() -> Result<usize> {
        probe::probe_libraries()?;
        let count = std::panic::catch_unwind(CudaContext::device_count)
            .map_err(|_| {
                BackendError::CudaNotAvailable(
                    "the CUDA driver failed while counting devices (driver older than the CUDA \
                     13.0 bindings?)"
                        .into(),
                )
            })?
            .map_err(|e| not_available(0, "cuInit / cuDeviceGetCount failed", e))?;
        Ok(count.max(0) as usize)
    }

    fn open(ordinal: usize) -> Result<Self> {
        let count = CudaContext::device_count()
            .map_err(|e| not_available(ordinal, "cuInit / cuDeviceGetCount failed", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::CudaNotAvailable(format!(
                "device {ordinal} requested, but the driver reports {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| not_available(ordinal, "creating the context failed", e))?;
        // SAFETY: cudarc's event tracking orders work between streams. This backend queues all of
        // its work (kernels, copies, cuBLAS) on the one stream created below, so stream order
        // already guarantees that every read follows the write it depends on; turning tracking
        // off before any allocation only skips the redundant events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| BackendError::device("CudaBackend::new stream", e))?;
        if ctx.has_async_alloc() {
            super::memory::keep_pool_memory(&ctx)?;
        }
        let dev = |e| BackendError::device("CudaBackend::new device query", e);
        let name = ctx.name().map_err(dev)?;
        let compute_capability = ctx.compute_capability().map_err(dev)?;
        let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(dev)?;
        let multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev)?;
        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability,
            free_bytes,
            total_bytes,
            multiprocessors: multiprocessors.max(0) as usize,
        };
        let ptx = compiled_ptx(compute_capability)?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| BackendError::device("CudaBackend::new load_module", e))?;
        let mut kernels = HashMap::new();
        for name in KERNELS {
            let f = module
                .load_function(name)
                .map_err(|e| BackendError::device("CudaBackend::new load_function", (name, e)))?;
            kernels.insert(name, (f, AtomicU64::new(0)));
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| BackendError::device("CudaBackend::new cublasCreate", e))?;
        Ok(CudaBackend {
            info,
            stream,
            blas,
            kernels,
            expert_tables: Default::default(),
            launches: Default::default(),
            tensor_core_prefill: Arc::new(AtomicBool::new(true)),
            tensor_core_moe: Arc::new(AtomicBool::new(true)),
            ctx,
        })
    }

    /// The device this backend runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The GPU's UUID as hex (what tells two GPUs apart across processes and hosts), if the
    /// driver reports it.
    pub fn uuid(&self) -> Option<String> {
        let u = self.ctx.uuid().ok()?;
        Some(
            u.bytes
                .iter()
                .map(|b| format!("{:02x}", *b as u8))
                .collect(),
        )
    }

    /// Waits until all queued work has finished (for timing; results copied to the host already
    /// wait for their own inputs).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| BackendError::device("synchronize", e))
    }

    /// The count of kernels and cuBLAS calls this backend has queued, shared (it keeps counting
    /// after the backend moves into an executor). At small batches the host's cost per launch,
    /// not the GPU, can bound a decode step; `tessera bench` reports launches per step so the
    /// two can be told apart.
    pub fn launch_counter(&self) -> Arc<AtomicU64> {
        self.launches.clone()
    }

    /// The switch of the tensor-core prompt attention (prefill.cu), shared like
    /// [`CudaBackend::launch_counter`]: on (the default), prompt steps that suit it take it; off,
    /// every step takes the paged decode kernels. `--prefill-attention` sets it, and the GPU
    /// benchmark flips it to time both on one prompt.
    pub fn tensor_core_prefill(&self) -> Arc<AtomicBool> {
        self.tensor_core_prefill.clone()
    }

    /// The switch of the tensor-core MoE kernels (moe_mma.cu), shared like the one above: on (the
    /// default), MoE steps past the SIMT kernels' range take them; off, those steps copy the
    /// per-expert offsets to the host and run cuBLAS per expert, as a GPU older than Ampere does.
    /// The GPU benchmark flips it to time both on one prompt.
    pub fn tensor_core_moe(&self) -> Arc<AtomicBool> {
        self.tensor_core_moe.clone()
    }

    /// Counts one launch (a kernel or a cuBLAS call).
    pub(super) fn counted(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    /// The kernel `name`, counted as launched: every caller launches what it looks up.
    pub(super) fn func(&self, name: &'static str) -> Result<&CudaFunction> {
        self.counted();
        let (f, n) = self
            .kernels
            .get(name)
            .ok_or_else(|| BackendError::device("kernel lookup", format!("no kernel {name}")))?;
        n.fetch_add(1, Ordering::Relaxed);
        Ok(f)
    }

    /// How many times kernel `name` has been launched (0 for a name that is no kernel): lets
    /// tests see which of two kernels serving the same operation ran.
    pub fn kernel_launches(&self, name: &str) -> u64 {
        self.kernels
            .get(name)
            .map_or(0, |(_, n)| n.load(Ordering::Relaxed))
    }

    /// `n` zeroed elements (at least one: the driver refuses empty allocations).
    pub(super) fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        op: &'static str,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| BackendError::device(op, e))
    }

    /// A copy of `data` in device memory (one zeroed element if `data` is empty).
    pub(super) fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        op: &'static str,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.zeros(op, 1);
        }
        self.stream
            .clone_htod(data)
            .map_err(|e| BackendError::device(op, e))
    }

    /// The first `n` elements of a device buffer, copied to the host (waits for the stream).
    pub(super) fn download<T: DeviceRepr>(
        &self,
        op: &'static str,
        data: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&data.slice(..n))
            .map_err(|e| BackendError::device(op, e))
    }

    /// A zeroed `[rows, cols]` tensor.
    pub(super) fn tensor(&self, op: &'static str, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            data: self.zeros(op, rows * cols)?,
            rows,
            cols,
        })
    }

    /// `n` elements (at least one) whose contents are unspecified: for buffers that the next
    /// kernel writes in full before anything reads them. Zeroing costs a memset launch per
    /// allocation, about as many as the step's kernels; the CPU emulator of the tests fills
    /// fresh allocations with 0xff bytes (NaN, or an out-of-range index), so a kernel that leaves
    /// an element unwritten fails the tests instead of reading a lucky zero.
    pub(super) fn uninit<T: DeviceRepr>(&self, op: &'static str, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: `alloc` is unsafe only because the memory is left unset; these buffers hold
        // plain numbers (every bit pattern is a valid f32, u32 or u16) and callers launch a
        // kernel that writes every element before any read.
        unsafe { self.stream.alloc(n.max(1)) }.map_err(|e| BackendError::device(op, e))
    }

    /// An unspecified `[rows, cols]` tensor for an operation's output that its kernel writes in
    /// full (see [`Self::uninit`]).
    pub(super) fn output(&self, op: &'static str, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            data: self.uninit(op, rows * cols)?,
            rows,
            cols,
        })
    }

    pub(super) fn upload_weight_impl(&self, w: HostTensor) -> Result<CudaWeight> {
        const OP: &str = "upload_weight";
        let shape = w.shape().to_vec();
        let data = if shape.len() == 1 {
            WeightData::F32(self.upload(OP, &w.to_f32_vec())?)
        } else {
            match w.view() {
                WeightView::F32(v) => WeightData::F32(self.upload(OP, v)?),
                WeightView::F16(v) => WeightData::Half {
                    dtype: DType::F16,
                    bits: self.upload(OP, bytemuck::cast_slice::<_, u16>(v))?,
                },
                WeightView::BF16(v) => WeightData::Half {
                    dtype: DType::BF16,
                    bits: self.upload(OP, bytemuck::cast_slice::<_, u16>(v))?,
                },
            }
        };
        Ok(CudaWeight { shape, data })
    }
}

/// Launch shape for `n` independent elements, 256 threads a block.
pub(super) fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row, `rows` blocks.
pub(super) fn grid_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A size as the `u32` the kernels take, or an error naming the operation.
pub(super) fn to_u32(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| BackendError::invalid(op, format!("{v} exceeds u32")))
}

/// The PTX of all kernels for compute capability `cc`, compiled on first request and cached for
/// the life of the process (NVRTC takes a noticeable fraction of a second per compile).
///
/// Needs NVRTC only (no driver, no GPU), so a machine without a GPU can check that the sources
/// compile for any architecture: `kernels/tests/nvrtc.rs` does, in CI, with NVRTC from PyPI.
pub fn compile_kernels(cc: (i32, i32)) -> Result<String> {
    probe::probe_nvrtc()?;
    compiled_ptx(cc)
}

fn compiled_ptx(cc: (i32, i32)) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<(i32, i32), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // Holding the lock while compiling makes concurrent first callers wait for one compile.
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ptx) = cache.get(&cc) {
        return Ok(ptx.clone());
    }
    let src: String = SOURCES
        .iter()
        // `#line` makes NVRTC's messages (and the emulator's reports) name the file and line.
        .map(|(name, text)| format!("#line 1 \"kernels/cuda/{name}\"\n{text}\n"))
        .collect();
    let opts = CompileOptions {
        // The device's virtual architecture: cudarc retrieves PTX (nvrtcGetPTX), which the driver
        // compiles for the exact chip when the module is loaded.
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "--std=c++17".into(),
        ],
        name: Some("tessera_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => BackendError::Device {
            op: "NVRTC compile",
            detail: format!(
                "{nvrtc:?} for compute_{}{}:\n{}",
                cc.0,
                cc.1,
                log.to_string_lossy()
            ),
        },
        other => BackendError::device("NVRTC compile", other),
    })?;
    let text = ptx.to_src();
    cache.insert(cc, text.clone());
    Ok(text)
}

//! Which device runs the model (`--device auto|cpu|cuda|cuda:N`), and building a step executor on
//! it: the one place where the CPU and CUDA backends are told apart at run time.
//!
//! Everything after [`load_executor`] is generic over the backend and sees a
//! `Box<dyn StepRunner + Send>`. In a build without the `cuda` feature `CudaBackend` still exists
//! (uninhabited), so this module needs no `#[cfg]`: asking for CUDA there is a typed
//! "CUDA not available" error, and `auto` quietly picks the CPU.
//!
//! The KV cache is sized here too, because a GPU sizes it from its own memory: with
//! [`KvSize::Auto`] a process may fill `--gpu-memory-utilization` of its GPU (vLLM's rule), and
//! the KV cache gets what the weights and an activation reserve leave of that
//! ([`auto_kv_bytes`]); the CPU takes [`DEFAULT_CPU_KV_BYTES`]. Worker processes that share a GPU
//! split the utilization between them ([`DeviceConfig::share_among`]).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_kernels::cuda::CudaBackend;
use tessera_kernels::{Backend, BackendError};

use crate::WorkerError;
use crate::checkpoint::Checkpoint;
use crate::collective::{Collective, HostStaged, NcclRank, SingleRank};
use crate::executor::{Executor, StepRunner};
use crate::layers::{MlaPolicy, MlaPrefill, TpContext};
use crate::metrics::{TimedCollective, WorkerMetrics};
use crate::model::Model;
use crate::profile::{ActivationProfile, StepLimits, profile_activations};

/// KV-cache memory on the CPU when nobody says how much.
pub const DEFAULT_CPU_KV_BYTES: u64 = 256 << 20;

/// The share of GPU memory the process may use, weights and KV cache included, by default.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f32 = 0.9;

/// The device a user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceKind {
    /// CUDA when a GPU and its libraries are present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A GPU: `ordinal` or, when unset, the process's local rank modulo the GPUs there are.
    Cuda {
        ordinal: Option<usize>,
    },
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceKind::Auto),
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda { ordinal: None }),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceKind::Cuda { ordinal: Some(n) })
                .ok_or_else(|| {
                    format!("unknown device {other:?}: expected auto, cpu, cuda or cuda:N")
                }),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Auto => f.write_str("auto"),
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda { ordinal: None } => f.write_str("cuda"),
            DeviceKind::Cuda { ordinal: Some(n) } => write!(f, "cuda:{n}"),
        }
    }
}

/// Which attention kernels a GPU's prompt steps take (`--prefill-attention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillAttention {
    /// The tensor-core kernel (tiles of up to 64 tokens of a sequence per block) where the step
    /// and the heads suit it and the GPU has tensor cores for it (sm_80+), else the paged ones.
    #[default]
    TensorCores,
    /// The paged kernels decode uses (a block per token), for every step: slower for long prompts,
    /// kept to compare against and as a fallback.
    Paged,
}

impl FromStr for PrefillAttention {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tensor-cores" => Ok(PrefillAttention::TensorCores),
            "paged" => Ok(PrefillAttention::Paged),
            other => Err(format!(
                "unknown prefill attention {other:?}: expected tensor-cores or paged"
            )),
        }
    }
}

impl fmt::Display for PrefillAttention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrefillAttention::TensorCores => "tensor-cores",
            PrefillAttention::Paged => "paged",
        })
    }
}

/// Which kernels a GPU's large MoE steps take (`--moe-kernels`; decode-sized steps always take
/// the grouped SIMT kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeKernels {
    /// The grouped tensor-core kernels (64 routed tokens of one expert per tile), with no copy to
    /// the host, on a GPU that has them (sm_80+), else cuBLAS per expert.
    #[default]
    TensorCores,
    /// The per-expert offsets copied to the host, then three cuBLAS products per active expert:
    /// kept to compare against and as a fallback.
    Cublas,
}

impl FromStr for MoeKernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tensor-cores" => Ok(MoeKernels::TensorCores),
            "cublas" => Ok(MoeKernels::Cublas),
            other => Err(format!(
                "unknown MoE kernels {other:?}: expected tensor-cores or cublas"
            )),
        }
    }
}

impl fmt::Display for MoeKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MoeKernels::TensorCores => "tensor-cores",
            MoeKernels::Cublas => "cublas",
        })
    }
}

/// Device settings of a process that runs the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceConfig {
    /// Default: [`DeviceKind::Auto`].
    pub kind: DeviceKind,
    /// Share of a GPU's memory this process may fill (weights, KV cache, activations), in (0, 1].
    /// Default: [`DEFAULT_GPU_MEMORY_UTILIZATION`]. Ignored on the CPU.
    pub gpu_memory_utilization: f32,
    /// This process's index among the workers of its host, which picks its GPU when
    /// [`DeviceKind::Cuda`] names none (0 for a single process).
    pub local_rank: usize,
    /// Largest decode batch replayed from a CUDA graph; 0 runs every step eagerly. Default:
    /// [`crate::graphs::DEFAULT_MAX_BATCH`]. Ignored on the CPU.
    pub cuda_graph_max_batch: usize,
    /// Attention kernels of prompt steps. Default: [`PrefillAttention::TensorCores`]. Ignored on
    /// the CPU.
    pub prefill_attention: PrefillAttention,
    /// Kernels of large MoE steps. Default: [`MoeKernels::TensorCores`]. Ignored on the CPU.
    pub moe_kernels: MoeKernels,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            kind: DeviceKind::Auto,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            local_rank: 0,
            cuda_graph_max_batch: crate::graphs::DEFAULT_MAX_BATCH,
            prefill_attention: PrefillAttention::default(),
            moe_kernels: MoeKernels::default(),
        }
    }
}

impl DeviceConfig {
    pub fn validate(&self) -> Result<(), WorkerError> {
        let u = self.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(WorkerError::Device(format!(
                "--gpu-memory-utilization {u}: must be in (0, 1]"
            )));
        }
        Ok(())
    }
}

impl DeviceConfig {
    /// The settings for one of `workers` processes started on this host: when they are more
    /// than the GPUs here, each gets its part of the utilization (two workers on one GPU at 0.9
    /// get 0.45 each). Without a GPU nothing changes.
    pub fn share_among(&self, workers: usize) -> DeviceConfig {
        let gpus = match self.kind {
            DeviceKind::Cpu | DeviceKind::Cuda { ordinal: Some(_) } => 1,
            _ => CudaBackend::device_count().unwrap_or(0),
        };
        let per_gpu = match (self.kind, gpus) {
            (DeviceKind::Cpu, _) | (_, 0) => 1,
            // One named GPU takes every worker.
            (DeviceKind::Cuda { ordinal: Some(_) }, _) => workers.max(1),
            _ => workers.div_ceil(gpus).max(1),
        };
        DeviceConfig {
            gpu_memory_utilization: self.gpu_memory_utilization / per_gpu as f32,
            ..*self
        }
    }
}

/// An opened device.
// One per process, moved into the executor once: the CPU variant being empty costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Device {
    Cpu(CpuBackend),
    Cuda(CudaBackend),
}

impl Device {
    /// Opens what `cfg` asks for. `auto` falls back to the CPU only when CUDA is *not
    /// available* (no driver, libraries or GPU, or a build without the feature); a GPU that is
    /// present but fails to open is an error, not a silent switch to a much slower device.
    pub fn open(cfg: &DeviceConfig) -> Result<Device, WorkerError> {
        cfg.validate()?;
        let cuda = |ordinal: Option<usize>| -> Result<CudaBackend, BackendError> {
            let ordinal = match ordinal {
                Some(n) => n,
                None => cfg.local_rank % CudaBackend::device_count()?.max(1),
            };
            let b = CudaBackend::new(ordinal)?;
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            let attention = cfg.prefill_attention == PrefillAttention::TensorCores;
            b.tensor_core_prefill().store(attention, relaxed);
            let moe = cfg.moe_kernels == MoeKernels::TensorCores;
            b.tensor_core_moe().store(moe, relaxed);
            Ok(b)
        };
        match cfg.kind {
            DeviceKind::Cpu => Ok(Device::Cpu(CpuBackend)),
            DeviceKind::Cuda { ordinal } => cuda(ordinal)
                .map(Device::Cuda)
                .map_err(|e| WorkerError::Device(format!("--device {}: {e}", cfg.kind))),
            DeviceKind::Auto => match cuda(None) {
                Ok(b) => Ok(Device::Cuda(b)),
                Err(BackendError::CudaNotAvailable(why)) => {
                    tracing::info!(%why, "no usable GPU; running on the CPU");
                    Ok(Device::Cpu(CpuBackend))
                }
                Err(e) => Err(WorkerError::Device(format!(
                    "--device auto: a GPU is present but could not be used: {e} (pass --device \
                     cpu to run on the CPU)"
                ))),
            },
        }
    }

    /// For logs and model info, e.g. "cpu (16 threads)" or "cuda:0 (NVIDIA H100 80GB HBM3)".
    pub fn name(&self) -> String {
        match self {
            Device::Cpu(b) => b.name(),
            Device::Cuda(b) => b.name(),
        }
    }

    /// What the worker tells the coordinator about its device.
    pub fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            name: self.name(),
            uuid: match self {
                Device::Cpu(_) => None,
                Device::Cuda(b) => b.uuid(),
            },
        }
    }
}

/// A device as the coordinator sees it (`HealthResponse`): it forms an NCCL group only from
/// ranks that each have a GPU of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub name: String,
    /// The GPU's UUID; `None` on the CPU.
    pub uuid: Option<String>,
}

/// How big the KV pool is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvSize {
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as this many bytes hold.
    Bytes(u64),
    /// What the device allows with this `--gpu-memory-utilization` (see the module docs).
    Auto { gpu_memory_utilization: f32 },
}

/// How this rank reaches the other ranks of its group.
pub enum GroupLink {
    /// A world of one.
    Single,
    /// A host collective (TCP between processes); device tensors are staged through the host.
    Host(Arc<dyn Collective<CpuBackend>>),
    /// NCCL, joining the group of unique id `id` (GPU ranks only, each on its own GPU).
    Nccl {
        id: Vec<u8>,
        rank: usize,
        world: usize,
        /// Deadline of joining and of every operation.
        timeout: Duration,
    },
}

/// Everything [`load_executor`] needs besides the device.
pub struct ExecutorPlan<'a> {
    /// The Hugging Face model folder.
    pub dir: &'a Path,
    pub shard: ShardSpec,
    pub link: GroupLink,
    pub kv: KvSize,
    pub block_size: usize,
    /// Times every collective when given (workers); `None` in a single process.
    pub metrics: Option<&'a WorkerMetrics>,
    /// Largest decode batch replayed from a CUDA graph ([`crate::graphs`]); 0 runs every step
    /// eagerly. Ignored on the CPU.
    pub cuda_graph_max_batch: usize,
    /// The largest step the scheduler sends: profiled before an automatic KV cache is sized
    /// ([`crate::profile`]), and no graph is captured for more sequences than it allows.
    pub limits: StepLimits,
    /// Which form MLA layers attend in ([`MlaPrefill::Auto`]: by sequence, expanding every head
    /// at once within `limits.max_step_tokens` context rows, fewer per pass beyond, and longer
    /// contexts in chunks of positions). Ignored by other attention.
    pub mla_prefill: MlaPrefill,
}

/// A loaded executor and what it took.
pub struct LoadedExecutor {
    pub runner: Box<dyn StepRunner + Send>,
    /// Bytes of the checkpoint tensors this rank loaded.
    pub weight_bytes: u64,
    /// What the largest step took, when the KV cache was sized from it.
    pub profile: Option<ActivationProfile>,
}

/// Loads `plan`'s shard of the model onto `device` and sizes its KV cache.
pub fn load_executor(
    device: Device,
    plan: ExecutorPlan<'_>,
) -> Result<LoadedExecutor, WorkerError> {
    match device {
        Device::Cpu(b) => {
            let comm: Arc<dyn Collective<CpuBackend>> = match &plan.link {
                GroupLink::Single => Arc::new(SingleRank),
                GroupLink::Host(c) => Arc::clone(c),
                GroupLink::Nccl { .. } => {
                    return Err(WorkerError::Device(
                        "the group was formed for NCCL, but this worker runs on the CPU (start \
                         it with --device cuda, or every worker with --device cpu)"
                            .into(),
                    ));
                }
            };
            // Graphs are a device's: the CPU has no launches to save.
            let plan = ExecutorPlan {
                cuda_graph_max_batch: 0,
                ..plan
            };
            build(b, comm, plan)
        }
        Device::Cuda(b) => {
            let comm: Arc<dyn Collective<CudaBackend>> = match &plan.link {
                GroupLink::Single => Arc::new(SingleRank),
                GroupLink::Host(c) => Arc::new(HostStaged::new(Arc::clone(c))),
                GroupLink::Nccl {
                    id,
                    rank,
                    world,
                    timeout,
                } => {
                    let r = NcclRank::from_id_bytes(&b, id, *rank, *world, *timeout)?;
                    tracing::info!(rank, world, version = ?r.comm().version(), "joined the NCCL group");
                    Arc::new(r)
                }
            };
            build(b, comm, plan)
        }
    }
}

fn build<B: Backend>(
    backend: B,
    comm: Arc<dyn Collective<B>>,
    plan: ExecutorPlan<'_>,
) -> Result<LoadedExecutor, WorkerError> {
    let comm: Arc<dyn Collective<B>> = match plan.metrics {
        Some(m) => Arc::new(TimedCollective::new(comm, m)),
        None => comm,
    };
    let spec = load_model_spec(plan.dir)?;
    let ckpt = Checkpoint::open(plan.dir)?;
    let tp = TpContext {
        shard: plan.shard,
        comm,
    };
    let mut model = Model::load_rank(backend, spec, &ckpt, tp)?;
    // The expanded MLA form holds a step's context rows at once: no more than the largest step
    // the profile measures.
    model.set_mla_policy(MlaPolicy {
        prefill: plan.mla_prefill,
        max_context_rows: plan.limits.max_step_tokens,
    });
    let weight_bytes = ckpt
        .touched()
        .iter()
        .filter_map(|n| ckpt.info(n).ok())
        .map(|i| i.shape.iter().product::<usize>() as u64 * i.dtype.size() as u64)
        .sum();
    let block_size = plan.block_size.max(1);
    plan.limits.validate()?;
    // A graph for more sequences than a step may have would never replay.
    let graph_max_batch = plan.cuda_graph_max_batch.min(plan.limits.max_seqs);
    let mut profile = None;
    let mut exec = match plan.kv {
        KvSize::Blocks(n) => Executor::new(model, n, block_size)?,
        KvSize::Bytes(bytes) => Executor::with_kv_budget(model, bytes, block_size)?,
        KvSize::Auto {
            gpu_memory_utilization,
        } => {
            profile = profile_activations(&mut model, plan.limits, block_size, graph_max_batch)?;
            let budget = KvBudget {
                utilization: gpu_memory_utilization,
                weight_bytes,
                reserve_bytes: profile.map_or(ACTIVATION_RESERVE_BYTES, |p| p.reserve_bytes()),
            };
            let bytes = auto_kv_bytes(model.backend(), budget)?;
            Executor::with_kv_budget(model, bytes, block_size)?
        }
    };
    exec.enable_graphs(graph_max_batch);
    tracing::info!(
        backend = %exec.backend(),
        graph_max_batch,
        weights_mib = weight_bytes >> 20,
        kv_blocks = exec.num_blocks(),
        block_size,
        "model loaded"
    );
    Ok(LoadedExecutor {
        runner: Box::new(exec),
        weight_bytes,
        profile,
    })
}

/// Device memory kept back from the KV cache for activations, cuBLAS workspaces and the driver's
/// own allocations where the largest step was not profiled ([`crate::profile`]).
pub const ACTIVATION_RESERVE_BYTES: u64 = 1 << 30;

/// What an automatic KV cache is sized from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvBudget {
    /// `--gpu-memory-utilization`: the share of the device this process may fill.
    pub utilization: f32,
    /// Bytes of the weights this process loaded.
    pub weight_bytes: u64,
    /// Bytes kept for everything else: the profiled activations, or
    /// [`ACTIVATION_RESERVE_BYTES`].
    pub reserve_bytes: u64,
}

/// The KV budget of [`KvSize::Auto`]. On a GPU: the `utilization` share of the whole device, less
/// the weights and the reserve, and never more than is free now less the reserve. Counting this
/// process's own use (rather than taking what is free) lets processes that share a GPU, each with
/// its share of `utilization`, size their caches at the same time without racing. On the CPU:
/// [`DEFAULT_CPU_KV_BYTES`].
pub fn auto_kv_bytes<B: Backend>(backend: &B, budget: KvBudget) -> Result<u64, WorkerError> {
    let Some(mem) = backend.device_memory() else {
        return Ok(DEFAULT_CPU_KV_BYTES);
    };
    let KvBudget {
        utilization,
        weight_bytes,
        reserve_bytes,
    } = budget;
    let share = (f64::from(utilization) * mem.total as f64) as u64;
    let budget = share
        .saturating_sub(weight_bytes)
        .saturating_sub(reserve_bytes)
        .min(mem.free.saturating_sub(reserve_bytes));
    let mib = |b: u64| b >> 20;
    if budget == 0 {
        return Err(WorkerError::KvCacheTooLarge(format!(
            "no GPU memory left for the KV cache: --gpu-memory-utilization {utilization} allows \
             {} MiB of {} MiB, the weights take {} MiB, {} MiB is kept for activations, and {} \
             MiB is free; raise the utilization, lower --max-step-tokens, or spread the model \
             over more GPUs",
            mib(share),
            mib(mem.total),
            mib(weight_bytes),
            mib(reserve_bytes),
            mib(mem.free)
        )));
    }
    tracing::info!(
        free_mib = mib(mem.free),
        total_mib = mib(mem.total),
        weights_mib = mib(weight_bytes),
        reserve_mib = mib(reserve_bytes),
        kv_mib = mib(budget),
        utilization,
        "sizing the KV cache from GPU memory"
    );
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for s in ["auto", "cpu", "cuda", "cuda:3"] {
            assert_eq!(s.parse::<DeviceKind>().unwrap().to_string(), s);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let err = bad.parse::<DeviceKind>().unwrap_err();
            assert!(err.contains(bad) && err.contains("cuda:N"), "{err}");
        }
    }

    #[test]
    fn kernel_choices_round_trip_and_name_bad_values() {
        for p in [PrefillAttention::TensorCores, PrefillAttention::Paged] {
            assert_eq!(p.to_string().parse::<PrefillAttention>(), Ok(p));
        }
        let err = "flash".parse::<PrefillAttention>().unwrap_err();
        assert!(
            err.contains("flash") && err.contains("tensor-cores"),
            "{err}"
        );
        for m in [MoeKernels::TensorCores, MoeKernels::Cublas] {
            assert_eq!(m.to_string().parse::<MoeKernels>(), Ok(m));
        }
        let err = "triton".parse::<MoeKernels>().unwrap_err();
        assert!(err.contains("triton") && err.contains("cublas"), "{err}");
    }

    #[test]
    fn utilization_outside_zero_one_is_refused() {
        for u in [0.0, -0.5, 1.01, f32::NAN] {
            let cfg = DeviceConfig {
                gpu_memory_utilization: u,
                ..DeviceConfig::default()
            };
            let err = Device::open(&cfg).err().expect("refused");
            assert!(
                err.to_string().contains("--gpu-memory-utilization"),
                "{err}"
            );
        }
    }

    /// Without a GPU (this build or this machine), `cpu` and `auto` give the CPU and `cuda`
    /// names why it is not available. On a GPU machine only the `cpu` case is checked.
    #[test]
    fn cpu_is_always_there_and_cuda_says_why_not() {
        let open = |kind| {
            Device::open(&DeviceConfig {
                kind,
                ..DeviceConfig::default()
            })
        };
        assert!(matches!(open(DeviceKind::Cpu), Ok(Device::Cpu(_))));
        if CudaBackend::device_count().is_ok() {
            return;
        }
        assert!(matches!(open(DeviceKind::Auto), Ok(Device::Cpu(_))));
        let err = open(DeviceKind::Cuda { ordinal: Some(0) })
            .err()
            .expect("no GPU");
        let msg = err.to_string();
        assert!(
            msg.contains("--device cuda:0") && msg.contains("CUDA not available"),
            "{msg}"
        );
    }

    #[test]
    fn the_cpu_kv_budget_is_the_default() {
        assert_eq!(
            auto_kv_bytes(
                &CpuBackend,
                KvBudget {
                    utilization: 0.9,
                    weight_bytes: 1 << 30,
                    reserve_bytes: ACTIVATION_RESERVE_BYTES
                }
            )
            .unwrap(),
            DEFAULT_CPU_KV_BYTES
        );
    }
}

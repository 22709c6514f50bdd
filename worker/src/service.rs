//! The worker's gRPC service (`tessera.worker.v1.Worker`): the coordinator assigns a shard, the
//! worker loads it and joins its peers' collective group, then runs each step it is sent.
//!
//! Forward passes are CPU-bound, so they run on tokio's blocking pool; a worker runs one step at a
//! time (steps are collective: every rank must run them in the same order). `Health` answers from
//! atomics, never waiting for the executor, so a health check cannot queue behind a step.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_common::ShardSpec;
use tessera_proto::worker::v1 as pb;
use tonic::{Request, Response, Status};

use crate::WorkerError;
use crate::collective::TcpRank;
use crate::device::{
    Device, DeviceConfig, DeviceIdentity, ExecutorPlan, GroupLink, KvSize, LoadedExecutor,
    load_executor,
};
use crate::executor::{SeqStep, StepRunner};
use crate::layers::MlaPrefill;
use crate::metrics::WorkerMetrics;
use crate::profile::StepLimits;
use crate::wire::step_response;

/// How long a rank waits for its peers, at bootstrap and in every collective, unless the
/// coordinator says otherwise in `LoadShardRequest`.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct WorkerService {
    executor: Arc<Mutex<Option<Box<dyn StepRunner + Send>>>>,
    /// The device each shard loads onto (opened anew per load: a rebuilt group starts clean).
    device: DeviceConfig,
    identity: DeviceIdentity,
    /// Bound at start so its address can be announced before any shard is assigned; kept for
    /// the worker's lifetime, because a rebuilt group (after a peer died) loads shards again.
    collective_listener: TcpListener,
    shutdown: Arc<tokio::sync::Notify>,
    metrics: Arc<WorkerMetrics>,
    /// Announced to the coordinator for scrape discovery.
    metrics_address: Option<String>,
    /// The rank of the loaded shard, for metric labels.
    rank: Arc<AtomicUsize>,
    /// Whether a shard is loaded, and its KV-cache blocks, for `Health`.
    ready: AtomicBool,
    kv_blocks: AtomicU64,
}

/// What a [`WorkerService`] is built from.
pub struct WorkerServiceConfig {
    pub collective_listener: TcpListener,
    /// Notified when the coordinator asks the worker to exit.
    pub shutdown: Arc<tokio::sync::Notify>,
    pub metrics: Arc<WorkerMetrics>,
    /// Where `metrics` are served, if anywhere.
    pub metrics_address: Option<String>,
    /// Where shards run (`--device`, `--gpu-memory-utilization`).
    pub device: DeviceConfig,
    /// That device as opened at start, reported by `Health`.
    pub identity: DeviceIdentity,
}

impl WorkerService {
    pub fn new(cfg: WorkerServiceConfig) -> Self {
        WorkerService {
            executor: Arc::new(Mutex::new(None)),
            collective_listener: cfg.collective_listener,
            shutdown: cfg.shutdown,
            metrics: cfg.metrics,
            metrics_address: cfg.metrics_address,
            device: cfg.device,
            identity: cfg.identity,
            rank: Arc::new(AtomicUsize::new(0)),
            ready: AtomicBool::new(false),
            kv_blocks: AtomicU64::new(0),
        }
    }
}

fn status(e: WorkerError) -> Status {
    match e {
        WorkerError::Request(_)
        | WorkerError::Plan(_)
        | WorkerError::Config(_)
        | WorkerError::KvCacheTooLarge(_) => Status::invalid_argument(e.to_string()),
        WorkerError::OutOfBlocks { .. } => Status::resource_exhausted(e.to_string()),
        WorkerError::Device(_) => Status::failed_precondition(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn shard_of(req: &pb::LoadShardRequest) -> Result<ShardSpec, WorkerError> {
    let a = req.shard.clone().unwrap_or_default();
    let experts = match a.placed {
        false => None,
        true => {
            let mut owned = std::collections::BTreeSet::new();
            for (i, r) in a.experts.iter().enumerate() {
                // A range past u32::MAX would wrap: refuse it, naming the field.
                let end = r.first.checked_add(r.count).ok_or_else(|| {
                    WorkerError::Plan(format!(
                        "shard.experts[{i}]: first {} + count {} overflows",
                        r.first, r.count
                    ))
                })?;
                owned.extend((r.first..end).map(|e| (r.layer as usize, e as usize)));
            }
            Some(owned)
        }
    };
    Ok(ShardSpec {
        rank: a.rank as usize,
        world_size: a.world_size.max(1) as usize,
        experts,
    })
}

/// The step limits the coordinator sent; 0 leaves a limit at its default.
fn limits_of(req: &pb::LoadShardRequest) -> StepLimits {
    let or = |v: u32, default: usize| match v {
        0 => default,
        v => v as usize,
    };
    let d = StepLimits::default();
    StepLimits {
        max_step_tokens: or(req.max_step_tokens, d.max_step_tokens),
        max_seqs: or(req.max_seqs, d.max_seqs),
    }
}

fn load(
    req: pb::LoadShardRequest,
    listener: Option<TcpListener>,
    metrics: &WorkerMetrics,
    device: &DeviceConfig,
) -> Result<LoadedExecutor, WorkerError> {
    let dir = PathBuf::from(&req.model_dir);
    let shard = shard_of(&req)?;
    let timeout = match req.collective_timeout_ms {
        0 => COLLECTIVE_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    // The device first: a GPU that cannot be opened fails the load before peers are waited for.
    let opened = Device::open(device)?;
    let link = match (shard.world_size, shard.rank) {
        (1, _) => GroupLink::Single,
        (world, rank) if !req.nccl_id.is_empty() => GroupLink::Nccl {
            id: req.nccl_id.clone(),
            rank,
            world,
            timeout,
        },
        (world, 0) => {
            let l = listener.ok_or_else(|| {
                WorkerError::Plan("this worker's collective listener is already in use".into())
            })?;
            GroupLink::Host(Arc::new(TcpRank::root(l, world, timeout)?))
        }
        (world, rank) => {
            let root: SocketAddr = req
                .peer_addresses
                .first()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    WorkerError::Plan(format!(
                        "peer_addresses[0] = {:?} is not an address",
                        req.peer_addresses.first()
                    ))
                })?;
            GroupLink::Host(Arc::new(TcpRank::join(rank, world, root, timeout)?))
        }
    };
    let kv = match (req.kv_blocks, req.kv_cache_bytes) {
        (0, 0) => KvSize::Auto {
            gpu_memory_utilization: device.gpu_memory_utilization,
        },
        (0, bytes) => KvSize::Bytes(bytes),
        (blocks, _) => KvSize::Blocks(usize::try_from(blocks).unwrap_or(usize::MAX)),
    };
    load_executor(
        opened,
        ExecutorPlan {
            dir: &dir,
            shard,
            link,
            kv,
            block_size: req.block_size.max(1) as usize,
            metrics: Some(metrics),
            cuda_graph_max_batch: device.cuda_graph_max_batch,
            limits: limits_of(&req),
            mla_prefill: MlaPrefill::Auto,
        },
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker task failed: {e}")))?
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn load_shard(
        &self,
        request: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        let req = request.into_inner();
        // The previous group's executor (and its collective connections) goes first.
        self.ready.store(false, Ordering::SeqCst);
        self.executor
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .take();
        let listener = self.collective_listener.try_clone().ok();
        let rank = shard_of(&req).map_err(status)?.rank;
        let metrics = Arc::clone(&self.metrics);
        let device = self.device;
        let LoadedExecutor {
            runner: executor,
            weight_bytes,
            ..
        } = blocking(move || load(req, listener, &metrics, &device).map_err(status)).await?;
        self.rank.store(rank, Ordering::Relaxed);
        self.metrics.loaded(rank, executor.num_blocks());
        let reply = pb::LoadShardResponse {
            kv_blocks: executor.num_blocks() as u64,
            weight_bytes,
            backend: executor.backend(),
            metrics_address: self.metrics_address.clone().unwrap_or_default(),
        };
        *self
            .executor
            .lock()
            .map_err(|_| Status::internal("poisoned"))? = Some(executor);
        self.kv_blocks.store(reply.kv_blocks, Ordering::SeqCst);
        self.ready.store(true, Ordering::SeqCst);
        Ok(Response::new(reply))
    }

    async fn step(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let req = request.into_inner();
        let executor = Arc::clone(&self.executor);
        let (metrics, rank) = (Arc::clone(&self.metrics), self.rank.load(Ordering::Relaxed));
        let reply = blocking(move || {
            let started = Instant::now();
            let mut guard = executor.lock().map_err(|_| Status::internal("poisoned"))?;
            let exec = guard
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("no shard loaded"))?;
            let seqs: Vec<SeqStep> = req.seqs.into_iter().map(SeqStep::from).collect();
            let result = exec.step(&seqs).map_err(status)?;
            metrics.step(rank, started.elapsed());
            Ok(step_response(req.step_id, result))
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let mut guard = self
            .executor
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        if let Some(exec) = guard.as_mut() {
            request
                .into_inner()
                .seq_ids
                .into_iter()
                .for_each(|id| exec.release(&[id]));
        }
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let ready = self.ready.load(Ordering::SeqCst);
        Ok(Response::new(pb::HealthResponse {
            ready,
            kv_blocks: if ready {
                self.kv_blocks.load(Ordering::SeqCst)
            } else {
                0
            },
            device: self.identity.name.clone(),
            device_uuid: self.identity.uuid.clone().unwrap_or_default(),
        }))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

//! A worker group driven over gRPC: the coordinator assigns each worker its shard, the workers
//! join each other's collective group (rank 0 is the rendezvous), and every step goes to all ranks.
//!
//! The group is either embedded ([`Cluster::launch`]: the coordinator starts the worker processes
//! on loopback; they die with it, killed when it drops them and exiting by themselves when their
//! stdin, a pipe from the coordinator, closes, so even a SIGKILLed coordinator leaves no orphans)
//! or made of workers found elsewhere ([`Cluster::connect`], e.g. through etcd).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tessera_common::{ModelSpec, PlacementMap, load_model_spec};
use tessera_kernels::cuda::NcclId;
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_worker::WorkerError;
use tessera_worker::device::DeviceConfig;
use tessera_worker::engine::EngineConfig;
use tessera_worker::executor::{SeqStep, StepResult, StepRunner};
use tessera_worker::profile::StepLimits;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::tls::{ClusterTls, cluster_endpoint};

/// How long a worker may take to start and announce its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one step may take before the cluster reports it failed, unless configured.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker may take to answer a health check between steps (a step waits for it).
const HEALTH_TIMEOUT: Duration = Duration::from_millis(1000);
/// Unanswered health checks in a row that count as a lost worker: one may be a busy machine.
/// A refused connection or an exited process counts at once.
const HEALTH_STRIKES: u32 = 2;

/// What to launch.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// The `tessera` executable (the workers are `tessera worker` processes).
    pub exe: PathBuf,
    pub model_dir: PathBuf,
    pub world_size: usize,
    pub cache: EngineConfig,
    /// When set, each worker sizes its KV cache to this many bytes instead of
    /// `cache.num_blocks` blocks, and the group offers the smallest capacity any rank reports.
    pub kv_cache_bytes: Option<u64>,
    /// Where each expert runs; `None` places contiguous blocks of experts by rank.
    pub placement: Option<PlacementMap>,
    /// How long a step (and each collective inside it) may take before the group is declared
    /// failed: a stalled worker becomes an error after this long, never a hang.
    pub step_timeout: Duration,
    /// Mutual TLS on the control plane: the coordinator presents this certificate to the workers
    /// and accepts only workers whose certificate chains to the cluster CA. Launched workers get
    /// the same files. Plain gRPC when `None`.
    pub cluster_tls: Option<ClusterTls>,
    /// The device launched workers run on; worker `i` is local rank `i` (its GPU, when the
    /// device names none). Connected workers use their own `--device`.
    pub device: DeviceConfig,
    /// The largest step the scheduler sends, told to every worker: the step each profiles
    /// before sizing its KV cache from GPU memory.
    pub limits: StepLimits,
}

/// A worker's addresses, as it announces them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEndpoint {
    pub grpc: String,
    pub collective: String,
}

pub struct Cluster {
    rt: tokio::runtime::Runtime,
    /// Held so the processes die with the cluster (`kill_on_drop`); empty for remote workers.
    children: Vec<Child>,
    clients: Vec<WorkerClient<Channel>>,
    spec: ModelSpec,
    placement: PlacementMap,
    /// The group's options and worker addresses, for loading a new placement.
    opts: LaunchOptions,
    endpoints: Vec<WorkerEndpoint>,
    step_id: u64,
    /// Health checks each rank left unanswered in a row.
    missed_health: Vec<u32>,
    num_blocks: usize,
    block_size: usize,
    backend: String,
    metrics_addresses: Vec<String>,
}

/// The embedded form keeps its historical name.
pub type LocalCluster = Cluster;

fn remote(rank: usize, detail: impl std::fmt::Display) -> WorkerError {
    WorkerError::Remote {
        rank,
        detail: detail.to_string(),
    }
}

/// An error's text followed by its causes' (a transport error's own text is only "transport
/// error" or "tcp connect error"; the cause says "Connection refused").
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// A status's message, then its causes (a transport failure, such as a TLS handshake the peer
/// refused, says what happened only in its causes). Unlike `Status`'s `Display`, the message is
/// not quoted, so errors relayed from a worker read as the worker wrote them.
pub(crate) fn status_text(s: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = s.message().to_string();
    if let Some(source) = s.source() {
        let more = with_causes(source);
        // tonic's message for a transport failure repeats its source's first words.
        if more.contains(&text) {
            text = more;
        } else if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
    }
    text
}

/// Starts one worker; returns it with its gRPC and collective addresses.
async fn start_worker(
    opts: &LaunchOptions,
    rank: usize,
) -> Result<(Child, String, String), WorkerError> {
    let exe = &opts.exe;
    let device = opts.device.share_among(opts.world_size);
    let tls_args = opts
        .cluster_tls
        .as_ref()
        .map(|t| t.config().worker_args())
        .unwrap_or_default();
    let mut child = Command::new(exe)
        .args(["worker", "--listen", "127.0.0.1:0", "--exit-with-stdin"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(tls_args)
        .args(["--device", &device.kind.to_string()])
        .args([
            "--gpu-memory-utilization",
            &device.gpu_memory_utilization.to_string(),
        ])
        .args(["--local-rank", &rank.to_string()])
        .args([
            "--cuda-graph-max-batch",
            &device.cuda_graph_max_batch.to_string(),
        ])
        .args(["--prefill-attention", &device.prefill_attention.to_string()])
        .args(["--moe-kernels", &device.moe_kernels.to_string()])
        // The flags above say everything: settings in the environment must not override them.
        .env_remove("TESSERA_CLUSTER_CA")
        .env_remove("TESSERA_CLUSTER_CERT")
        .env_remove("TESSERA_CLUSTER_KEY")
        .env_remove("TESSERA_CLUSTER_SERVER_NAME")
        .env_remove("TESSERA_DEVICE")
        .env_remove("TESSERA_GPU_MEMORY_UTILIZATION")
        .env_remove("TESSERA_LOCAL_RANK")
        .env_remove("TESSERA_CUDA_GRAPH_MAX_BATCH")
        .env_remove("TESSERA_ENFORCE_EAGER")
        .env_remove("TESSERA_PREFILL_ATTENTION")
        .env_remove("TESSERA_MOE_KERNELS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| remote(rank, format!("cannot start {}: {e}", exe.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| remote(rank, "no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| remote(rank, format!("did not start within {START_TIMEOUT:?}")))?
        .map_err(|e| remote(rank, e))?
        .ok_or_else(|| remote(rank, "exited before announcing its address"))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
            .ok_or_else(|| remote(rank, format!("unexpected announcement {line:?}")))
    };
    Ok((child, field("grpc=")?, field("collective=")?))
}

/// Plan-time checks, before any process starts: heads divide, placement fits the model.
fn plan(opts: &LaunchOptions) -> Result<(ModelSpec, PlacementMap), WorkerError> {
    let spec = load_model_spec(&opts.model_dir)?;
    let world = opts.world_size.max(1);
    spec.check_tensor_parallel(world)?;
    let placement = opts
        .placement
        .clone()
        .unwrap_or_else(|| PlacementMap::contiguous(&spec, world));
    placement.validate(&spec)?;
    if placement.world_size != world {
        return Err(WorkerError::Plan(format!(
            "placement is for {} ranks, --tp is {world}",
            placement.world_size
        )));
    }
    tracing::info!(
        ranks = world,
        experts_per_rank = ?placement.experts_per_rank(),
        placement = %serde_json::to_string(&placement).unwrap_or_default(),
        "expert placement"
    );
    Ok((spec, placement))
}

fn runtime() -> Result<tokio::runtime::Runtime, WorkerError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| remote(0, format!("cannot start the runtime: {e}")))
}

impl Cluster {
    /// Starts `opts.world_size` worker processes on loopback and loads their shards.
    pub fn launch(opts: &LaunchOptions) -> Result<Self, WorkerError> {
        let (spec, placement) = plan(opts)?;
        let rt = runtime()?;
        let (children, endpoints) = rt.block_on(async {
            let mut children = Vec::new();
            let mut endpoints = Vec::new();
            for rank in 0..opts.world_size.max(1) {
                let (child, grpc, collective) = start_worker(opts, rank).await?;
                children.push(child);
                endpoints.push(WorkerEndpoint { grpc, collective });
            }
            Ok::<_, WorkerError>((children, endpoints))
        })?;
        Self::form(rt, children, &endpoints, opts, spec, placement)
    }

    /// Forms a group from running workers (rank = position in `endpoints`) and loads their shards.
    pub fn connect(
        endpoints: &[WorkerEndpoint],
        opts: &LaunchOptions,
    ) -> Result<Self, WorkerError> {
        if endpoints.len() != opts.world_size.max(1) {
            return Err(WorkerError::Plan(format!(
                "{} workers for a world size of {}",
                endpoints.len(),
                opts.world_size
            )));
        }
        let (spec, placement) = plan(opts)?;
        Self::form(runtime()?, Vec::new(), endpoints, opts, spec, placement)
    }

    fn form(
        rt: tokio::runtime::Runtime,
        children: Vec<Child>,
        endpoints: &[WorkerEndpoint],
        opts: &LaunchOptions,
        spec: ModelSpec,
        placement: PlacementMap,
    ) -> Result<Self, WorkerError> {
        let (clients, loaded) = rt.block_on(async {
            let mut clients = Vec::new();
            for (rank, e) in endpoints.iter().enumerate() {
                let endpoint = cluster_endpoint(&e.grpc, opts.cluster_tls.as_ref())
                    .map_err(|err| remote(rank, err))?;
                let channel = tokio::time::timeout(START_TIMEOUT, endpoint.connect())
                    .await
                    .map_err(|_| {
                        remote(
                            rank,
                            format!("no answer from {} within {START_TIMEOUT:?}", e.grpc),
                        )
                    })?
                    .map_err(|err| {
                        remote(
                            rank,
                            format!("cannot reach {}: {}", e.grpc, with_causes(&err)),
                        )
                    })?;
                clients.push(WorkerClient::new(channel));
            }
            let loaded = load_shards(&clients, endpoints, opts, &placement).await?;
            Ok::<_, WorkerError>((clients, loaded))
        })?;
        Ok(Cluster {
            rt,
            children,
            clients,
            spec,
            placement,
            opts: opts.clone(),
            endpoints: endpoints.to_vec(),
            step_id: 0,
            num_blocks: loaded.capacity,
            missed_health: vec![0; endpoints.len()],
            block_size: opts.cache.block_size.max(1),
            backend: loaded.backend,
            metrics_addresses: loaded.metrics_addresses,
        })
    }

    /// The expert placement the group was loaded with.
    pub fn placement(&self) -> &PlacementMap {
        &self.placement
    }
}

/// What the ranks reported after loading their shards.
struct Loaded {
    /// The smallest KV capacity any rank reported.
    capacity: usize,
    /// Rank 0's backend name.
    backend: String,
    /// Where each rank serves metrics (ranks that serve none are left out).
    metrics_addresses: Vec<String>,
}

/// Sends every rank its shard of `placement`.
async fn load_shards(
    clients: &[WorkerClient<Channel>],
    endpoints: &[WorkerEndpoint],
    opts: &LaunchOptions,
    placement: &PlacementMap,
) -> Result<Loaded, WorkerError> {
    let peers: Vec<String> = endpoints.iter().map(|e| e.collective.clone()).collect();
    let nccl_id = nccl_id_for(clients).await;
    let mut loads = tokio::task::JoinSet::new();
    for (rank, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let req = pb::LoadShardRequest {
            model_dir: opts.model_dir.to_string_lossy().into_owned(),
            shard: Some(assignment(placement, rank)),
            block_size: opts.cache.block_size as u32,
            peer_addresses: peers.clone(),
            kv_blocks: if opts.kv_cache_bytes.is_some() {
                0
            } else {
                opts.cache.num_blocks as u64
            },
            kv_cache_bytes: opts.kv_cache_bytes.unwrap_or(0),
            collective_timeout_ms: opts.step_timeout.as_millis().clamp(1, u128::from(u32::MAX))
                as u32,
            nccl_id: nccl_id.clone(),
            max_step_tokens: u32::try_from(opts.limits.max_step_tokens).unwrap_or(u32::MAX),
            max_seqs: u32::try_from(opts.limits.max_seqs).unwrap_or(u32::MAX),
        };
        loads.spawn(async move { (rank, client.load_shard(req).await) });
    }
    let (mut capacity, mut backend) = (usize::MAX, String::new());
    let mut metrics = vec![String::new(); clients.len()];
    while let Some(joined) = loads.join_next().await {
        let (rank, reply) = joined.map_err(|e| remote(0, e))?;
        let reply = reply
            .map_err(|s| remote(rank, status_text(&s)))?
            .into_inner();
        tracing::info!(rank, backend = %reply.backend, mib = reply.weight_bytes >> 20, kv_blocks = reply.kv_blocks, "worker loaded its shard");
        capacity = capacity.min(reply.kv_blocks as usize);
        if rank == 0 {
            backend = reply.backend;
        }
        metrics[rank] = reply.metrics_address;
    }
    metrics.retain(|a| !a.is_empty());
    Ok(Loaded {
        capacity,
        backend,
        metrics_addresses: metrics,
    })
}

/// NCCL's unique id for a new group when every rank reports a GPU of its own and NCCL loads in
/// this process (which then hosts NCCL's bootstrap root); empty otherwise, and the group uses the
/// TCP collective (GPU ranks stage their tensors through the host). Ranks that share a GPU cannot
/// form an NCCL group (NCCL refuses duplicate GPUs), and CPU ranks have no use for one.
async fn nccl_id_for(clients: &[WorkerClient<Channel>]) -> Vec<u8> {
    if clients.len() < 2 {
        return Vec::new();
    }
    let mut gpus = std::collections::HashSet::new();
    for (rank, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let asked = tokio::time::timeout(HEALTH_TIMEOUT, client.health(pb::HealthRequest {}));
        let Ok(Ok(reply)) = asked.await else {
            // LoadShard will report the unreachable worker; the group is not formed anyway.
            return Vec::new();
        };
        let reply = reply.into_inner();
        if reply.device_uuid.is_empty() || !gpus.insert(reply.device_uuid.clone()) {
            tracing::info!(rank, device = %reply.device, "TCP collective: not every rank has a GPU of its own");
            return Vec::new();
        }
    }
    match NcclId::new() {
        Ok(id) => {
            tracing::info!(
                ranks = clients.len(),
                "NCCL collective: every rank has its own GPU"
            );
            id.as_bytes().to_vec()
        }
        Err(e) => {
            tracing::warn!(error = %e, "NCCL is not available to the coordinator: the GPU workers exchange tensors through the host (TCP), which is much slower");
            Vec::new()
        }
    }
}

/// Rank `rank`'s part of `placement`, as the control plane carries it.
fn assignment(placement: &PlacementMap, rank: usize) -> pb::ShardAssignment {
    let owned = placement.shard(rank).experts.unwrap_or_default();
    pb::ShardAssignment {
        rank: rank as u32,
        world_size: placement.world_size as u32,
        experts: owned
            .into_iter()
            .map(|(layer, e)| pb::ExpertRange {
                layer: layer as u32,
                first: e as u32,
                count: 1,
            })
            .collect(),
        placed: true,
    }
}

impl Cluster {
    /// Process ids of the workers, by rank.
    pub fn worker_pids(&self) -> Vec<Option<u32>> {
        self.children.iter().map(Child::id).collect()
    }
}

impl StepRunner for Cluster {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Sends the step to every rank at once (they run it collectively) and returns rank 0's
    /// results; the first rank to fail fails the step, without waiting for the others.
    fn step(&mut self, seqs: &[SeqStep]) -> Result<StepResult, WorkerError> {
        self.step_id += 1;
        let req = pb::StepRequest {
            step_id: self.step_id,
            seqs: seqs.iter().map(pb::SequenceStep::from).collect(),
        };
        let clients = self.clients.clone();
        let limit = self.opts.step_timeout;
        self.rt.block_on(async move {
            let mut steps = tokio::task::JoinSet::new();
            for (rank, mut client) in clients.into_iter().enumerate() {
                let req = req.clone();
                steps.spawn(async move {
                    let reply = tokio::time::timeout(limit, client.step(req)).await;
                    (rank, reply)
                });
            }
            let mut first = None;
            while let Some(joined) = steps.join_next().await {
                let (rank, reply) = joined.map_err(|e| remote(0, e))?;
                let reply = reply
                    .map_err(|_| remote(rank, format!("step timed out after {limit:?}")))?
                    .map_err(|s| remote(rank, format!("step failed: {}", with_causes(&s))))?;
                if rank == 0 {
                    first = Some(reply.into_inner());
                }
            }
            first
                .map(StepResult::from)
                .ok_or_else(|| remote(0, "no reply"))
        })
    }

    fn release(&mut self, seq_ids: &[u64]) {
        if seq_ids.is_empty() {
            return;
        }
        let clients = self.clients.clone();
        let req = pb::ReleaseRequest {
            seq_ids: seq_ids.to_vec(),
        };
        self.rt.block_on(async move {
            let mut calls = tokio::task::JoinSet::new();
            for mut c in clients {
                let req = req.clone();
                // A failed release only leaks sampler state on that worker; a dead worker shows
                // up in the next step.
                calls.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.release(req)).await;
                });
            }
            while calls.join_next().await.is_some() {}
        });
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn backend(&self) -> String {
        format!("{} x{}", self.backend, self.clients.len())
    }

    fn world_size(&self) -> usize {
        self.clients.len()
    }

    fn metrics_addresses(&self) -> Vec<String> {
        self.metrics_addresses.clone()
    }

    /// Every rank answers `Health` within [`HEALTH_TIMEOUT`] and still holds its shard; a worker
    /// process this cluster started must not have exited. Called between steps only, so it never
    /// overlaps one (and the worker answers without touching its executor).
    fn check_health(&mut self) -> Result<(), WorkerError> {
        for (rank, child) in self.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(remote(
                    rank,
                    format!("the worker process exited ({status})"),
                ));
            }
        }
        let clients = self.clients.clone();
        let mut replies = self.rt.block_on(async move {
            let mut calls = tokio::task::JoinSet::new();
            for (rank, mut c) in clients.into_iter().enumerate() {
                calls.spawn(async move {
                    let reply =
                        tokio::time::timeout(HEALTH_TIMEOUT, c.health(pb::HealthRequest {}));
                    (rank, reply.await)
                });
            }
            let mut replies = Vec::new();
            while let Some(joined) = calls.join_next().await {
                replies.push(joined.map_err(|e| remote(0, e))?);
            }
            Ok::<_, WorkerError>(replies)
        })?;
        replies.sort_by_key(|(rank, _)| *rank);
        for (rank, reply) in replies {
            match reply {
                Err(_) => {
                    self.missed_health[rank] += 1;
                    let missed = self.missed_health[rank];
                    tracing::warn!(
                        rank,
                        missed,
                        "a worker did not answer a health check within {HEALTH_TIMEOUT:?}"
                    );
                    if missed >= HEALTH_STRIKES {
                        return Err(remote(
                            rank,
                            format!(
                                "no answer to {missed} health checks in a row ({HEALTH_TIMEOUT:?} each)"
                            ),
                        ));
                    }
                }
                Ok(Err(s)) => {
                    let addr = &self.endpoints[rank].grpc;
                    return Err(remote(
                        rank,
                        format!("health check of {addr} failed: {}", with_causes(&s)),
                    ));
                }
                Ok(Ok(r)) if !r.get_ref().ready => {
                    return Err(remote(rank, "has no shard loaded (restarted?)"));
                }
                Ok(Ok(_)) => self.missed_health[rank] = 0,
            }
        }
        Ok(())
    }

    /// Reloads every rank's shard under `placement` (the workers stay up; their KV caches are
    /// rebuilt, so the caller must have released every sequence).
    fn set_placement(&mut self, placement: &PlacementMap) -> Result<(), WorkerError> {
        placement.validate(&self.spec)?;
        if placement.world_size != self.clients.len() {
            return Err(WorkerError::Plan(format!(
                "placement is for {} ranks, the group has {}",
                placement.world_size,
                self.clients.len()
            )));
        }
        tracing::info!(
            experts_per_rank = ?placement.experts_per_rank(),
            "loading a new expert placement"
        );
        let (clients, endpoints, opts) = (&self.clients, &self.endpoints, &self.opts);
        let loaded = self
            .rt
            .block_on(load_shards(clients, endpoints, opts, placement))?;
        self.num_blocks = loaded.capacity;
        self.metrics_addresses = loaded.metrics_addresses;
        self.placement = placement.clone();
        Ok(())
    }
}

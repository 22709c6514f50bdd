//! `tessera serve`: the coordinator with its embedded worker group (in this process with
//! `--tp 1`, worker processes on loopback with `--tp N`), serving the OpenAI-compatible HTTP API
//! and the public gRPC API until Ctrl-C or SIGTERM.
//!
//! Once both listeners are bound it prints `TESSERA_SERVE_READY http=ADDR grpc=ADDR` on stdout,
//! so scripts and tests can use port 0.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_common::{GenerationConfig, PlacementMap, ShardSpec, load_model_spec};
use tessera_coordinator::auth::ApiKeyAuth;
use tessera_coordinator::cluster::{Cluster, LaunchOptions, WorkerEndpoint};
use tessera_coordinator::grpc::GrpcApi;
use tessera_coordinator::jobs::JobManager;
use tessera_coordinator::registry::Registry;
use tessera_coordinator::scheduler::SchedulerConfig;
use tessera_coordinator::serving::ModelInfo;
use tessera_coordinator::serving::chat::ChatTemplate;
use tessera_coordinator::serving::engine::{self, RunnerFactory};
use tessera_coordinator::tls::incoming::{self, FailureLog};
use tessera_coordinator::tls::{ClusterTls, PublicTls};
use tessera_coordinator::tokenizer::Tokenizer;
use tessera_membership::MembershipConfig;
use tessera_worker::WorkerError;
use tessera_worker::device::{Device, ExecutorPlan, GroupLink, KvSize, load_executor};
use tessera_worker::engine::EngineConfig;
use tessera_worker::executor::StepRunner;
use tessera_worker::layers::MlaPrefill;
use tessera_worker::profile::StepLimits;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face model folder: config.json, *.safetensors, tokenizer.json (for text),
    /// tokenizer_config.json (for chat templates), generation_config.json. Default: the demo
    /// model shipped in models/tessera-demo.
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: Option<PathBuf>,
    /// The model name clients use; default: the folder's name.
    #[arg(long, env = "TESSERA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Tensor-parallel world size: N > 1 starts N worker processes on loopback.
    #[arg(long, default_value_t = 1, env = "TESSERA_TP")]
    pub tp: usize,
    /// Interface for the HTTP and gRPC listeners.
    #[arg(long, default_value = "127.0.0.1", env = "TESSERA_HOST")]
    pub host: IpAddr,
    /// HTTP (OpenAI-compatible) port; 0 picks a free port and logs it.
    #[arg(long, default_value_t = 8000, env = "TESSERA_PORT")]
    pub port: u16,
    /// gRPC (tessera.v1) port; 0 picks a free port and logs it.
    #[arg(long, default_value_t = 50051, env = "TESSERA_GRPC_PORT")]
    pub grpc_port: u16,
    /// Positions per KV-cache block.
    #[arg(long, default_value_t = 16, env = "TESSERA_BLOCK_SIZE")]
    pub block_size: usize,
    /// Memory each worker gives its KV cache, in MiB; the capacity is what the workers report.
    /// Default: 256 on the CPU; on a GPU, what --gpu-memory-utilization leaves after the weights.
    #[arg(long, env = "TESSERA_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<u64>,
    /// Most sequences in one step. Workers capture no CUDA graph for more, and a worker that
    /// sizes its KV cache from GPU memory profiles a step of this many sequences first.
    #[arg(long, default_value_t = tessera_worker::profile::DEFAULT_MAX_SEQS, env = "TESSERA_MAX_RUNNING")]
    pub max_running: usize,
    /// Most requests waiting to start; more are refused with HTTP 429 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256, env = "TESSERA_MAX_WAITING")]
    pub max_waiting: usize,
    /// Most tokens in one step (decode tokens plus prefill chunks). A worker that sizes its KV
    /// cache from GPU memory first runs a step this large, with every row's logits, and keeps
    /// the memory it took out of the cache: a larger value prefills faster but leaves less cache.
    #[arg(long, default_value_t = tessera_worker::profile::DEFAULT_MAX_STEP_TOKENS, env = "TESSERA_MAX_STEP_TOKENS")]
    pub max_step_tokens: usize,
    /// Require this API key (`Authorization: Bearer KEY`) on every HTTP route and gRPC method
    /// except those in --api-key-exempt. Prefer the environment variable to keep the key out of
    /// process listings. Unset: no authentication.
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// HTTP paths and gRPC service names reachable without the API key, comma-separated; an empty
    /// value protects everything.
    #[arg(
        long,
        env = "TESSERA_API_KEY_EXEMPT",
        value_delimiter = ',',
        default_value = "/health,/metrics,grpc.health.v1.Health"
    )]
    pub api_key_exempt: Vec<String>,
    /// On SIGTERM or Ctrl-C, stop accepting requests and let those in flight finish for up to
    /// this many seconds before failing the rest with 503 / UNAVAILABLE and exiting.
    #[arg(long, default_value_t = 30, env = "TESSERA_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: u64,
    /// Longest a step (and each collective inside it) may take: a stalled worker fails the
    /// requests in flight with 503 / UNAVAILABLE after this long and the group is rebuilt. Raise
    /// it for very long prefill chunks on slow hardware.
    #[arg(long, default_value_t = 30, env = "TESSERA_STEP_TIMEOUT_SECS")]
    pub step_timeout_secs: u64,
    #[command(flatten)]
    pub tls: crate::tls::PublicTlsArgs,
    #[command(flatten)]
    pub cluster_tls: crate::tls::ClusterTlsArgs,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// The TLS settings the flags name, loaded (files read and checked) before anything starts.
struct Tls {
    public: Option<PublicTls>,
    cluster: Option<ClusterTls>,
}

impl Tls {
    fn load(args: &ServeArgs) -> Result<Self> {
        let public = args.tls.config().load()?;
        let cluster = args.cluster_tls.config().load()?;
        if public.is_some() {
            tracing::info!("TLS on the HTTP and gRPC listeners");
        }
        if cluster.is_some() {
            tracing::info!("mutual TLS between the coordinator and its workers");
        }
        Ok(Tls { public, cluster })
    }
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Address (ip:port) where workers register: serves tessera.worker.v1.Registry, and workers
    /// started with `tessera worker --coordinator ADDR` join the group through it (static
    /// membership, no etcd). One of --listen or --etcd is required.
    #[arg(long, env = "TESSERA_COORDINATOR_LISTEN", conflicts_with = "etcd")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub etcd: crate::membership::EtcdArgs,
    /// How long to wait for --tp workers to register before giving up (at start) or retrying
    /// (after a worker was lost).
    #[arg(long, default_value_t = 300, env = "TESSERA_WAIT_FOR_WORKERS_SECS")]
    pub wait_for_workers_secs: u64,
}

/// Where a coordinator finds its workers, when it does not start them itself.
pub enum Membership {
    /// Workers registered in etcd.
    Etcd(MembershipConfig),
    /// Workers that registered with this coordinator's registry (`--listen`).
    Registry(Registry),
}

impl Membership {
    /// Waits until at least `world` workers are known; returns them all, ordered by id.
    fn wait_for(
        &self,
        world: usize,
        wait: Duration,
    ) -> Result<Vec<(String, WorkerEndpoint)>, String> {
        match self {
            Membership::Etcd(cfg) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"))?;
                let members = rt
                    .block_on(async {
                        let mut w = tessera_membership::watch(cfg).await?;
                        tessera_membership::wait_for_members(&mut w, world, wait).await
                    })
                    .map_err(|e| e.to_string())?;
                Ok(members
                    .into_iter()
                    .map(|m| {
                        let endpoint = WorkerEndpoint {
                            grpc: m.grpc_addr,
                            collective: m.collective_addr,
                        };
                        (m.id, endpoint)
                    })
                    .collect())
            }
            Membership::Registry(registry) => Ok(registry
                .wait_for_members(world, wait)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|m| (m.id, m.endpoint))
                .collect()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Membership::Etcd(cfg) => {
                format!("etcd {} ({})", cfg.endpoints_display(), cfg.prefix)
            }
            Membership::Registry(r) => format!("the registry on {}", r.addr()),
        }
    }
}

pub fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let tls = Tls::load(&args.serve)?;
    let membership = match (args.etcd.config()?, args.listen) {
        (Some(cfg), None) => Membership::Etcd(cfg),
        (None, Some(addr)) => Membership::Registry(Registry::serve(addr, tls.cluster.as_ref())?),
        (Some(_), Some(_)) => bail!("--listen and --etcd are alternatives; pass one"),
        (None, None) => bail!(
            "tessera coordinator needs --listen ADDR (workers join with `tessera worker \
             --coordinator ADDR`) or --etcd URL (workers register in etcd); \
             `tessera serve --tp N` runs an embedded cluster instead"
        ),
    };
    let wait = Duration::from_secs(args.wait_for_workers_secs);
    run_with(args.serve, Some((membership, wait)), tls)
}

/// A group formed from the first `--tp` workers `membership` knows (ordered by id = rank order);
/// the same path for etcd and for the registry.
fn discovered_factory(
    launch: LaunchOptions,
    membership: Membership,
    wait: Duration,
) -> RunnerFactory {
    Box::new(move || {
        let world = launch.world_size;
        let source = membership.describe();
        tracing::info!(from = %source, world, "waiting for workers");
        let members = membership
            .wait_for(world, wait)
            .map_err(|e| WorkerError::Plan(format!("forming the group from {source}: {e}")))?;
        let endpoints: Vec<WorkerEndpoint> = members
            .into_iter()
            .take(world)
            .map(|(id, endpoint)| {
                tracing::info!(%id, grpc = %endpoint.grpc, "group member");
                endpoint
            })
            .collect();
        Ok(Box::new(Cluster::connect(&endpoints, &launch)?) as Box<dyn StepRunner + Send>)
    })
}

/// Builds the worker group the flags describe; called again to rebuild it after a failure.
fn factory(
    args: &ServeArgs,
    found: Option<(Membership, Duration)>,
    cluster_tls: Option<ClusterTls>,
) -> Result<RunnerFactory> {
    let cache = EngineConfig {
        block_size: args.block_size,
        num_blocks: 0,
    };
    // 0: each worker sizes its cache for its device (KvSize::Auto).
    let kv_bytes = args.kv_cache_mib.map_or(0, |mib| mib << 20);
    let dir = crate::demo::model_or_default(args.model.clone())?;
    let limits = StepLimits {
        max_step_tokens: args.max_step_tokens,
        max_seqs: args.max_running,
    };
    let launch = LaunchOptions {
        exe: std::env::current_exe().context("locating the tessera executable")?,
        model_dir: dir.clone(),
        world_size: args.tp,
        cache,
        kv_cache_bytes: Some(kv_bytes),
        limits,
        placement: None,
        step_timeout: std::time::Duration::from_secs(args.step_timeout_secs.max(1)),
        cluster_tls,
        device: args.device.config(0),
    };
    if let Some((membership, wait)) = found {
        return Ok(discovered_factory(launch, membership, wait));
    }
    if args.tp > 1 {
        return Ok(Box::new(move || {
            Ok(Box::new(Cluster::launch(&launch)?) as Box<dyn StepRunner + Send>)
        }));
    }
    let device = args.device.config(0);
    Ok(Box::new(move || {
        let plan = ExecutorPlan {
            dir: &dir,
            shard: ShardSpec::whole(),
            link: GroupLink::Single,
            kv: match kv_bytes {
                0 => KvSize::Auto {
                    gpu_memory_utilization: device.gpu_memory_utilization,
                },
                bytes => KvSize::Bytes(bytes),
            },
            block_size: cache.block_size,
            metrics: None,
            cuda_graph_max_batch: device.cuda_graph_max_batch,
            limits,
            mla_prefill: MlaPrefill::Auto,
        };
        Ok(load_executor(Device::open(&device)?, plan)?.runner)
    }))
}

/// `tessera serve`: the embedded worker group.
pub fn run(args: ServeArgs) -> Result<()> {
    let tls = Tls::load(&args)?;
    if tls.cluster.is_some() && args.tp == 1 {
        tracing::warn!("--cluster-* TLS settings have no effect with --tp 1: there are no workers");
    }
    run_with(args, None, tls)
}

/// Serves with the embedded group (`found` = `None`) or one formed from `found`'s workers.
fn run_with(args: ServeArgs, found: Option<(Membership, Duration)>, tls: Tls) -> Result<()> {
    if args.tp == 0 || args.block_size == 0 {
        bail!("--tp and --block-size must be at least 1");
    }
    let dir = &crate::demo::model_or_default(args.model.clone())?;
    let spec = load_model_spec(dir)
        .with_context(|| format!("reading the model config in {}", dir.display()))?;
    spec.check_tensor_parallel(args.tp)?;
    let generation = GenerationConfig::load(dir)?;
    let tokenizer = Tokenizer::load(dir)?.map(Arc::new);
    let chat = ChatTemplate::load(dir).map_err(anyhow::Error::msg)?;
    let mut eos_token_ids = generation.eos_token_ids();
    for id in &spec.eos_token_ids {
        if !eos_token_ids.contains(id) {
            eos_token_ids.push(*id);
        }
    }
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let mut make = factory(&args, found, tls.cluster)?;
    tracing::info!(model = %dir.display(), tp = args.tp, "starting the worker group");
    let runner = make()?;
    let placement = PlacementMap::contiguous(&spec, args.tp);
    let info = ModelInfo {
        name,
        architecture: spec.architecture.clone(),
        vocab_size: spec.vocab_size,
        max_context: spec.max_position_embeddings,
        eos_token_ids,
        generation,
        tokenizer,
        chat,
        world_size: args.tp,
        backend: runner.backend(),
        kv_blocks: runner.num_blocks(),
        block_size: runner.block_size(),
        placement_json: serde_json::to_string(&placement)?,
    };
    tracing::info!(
        backend = %info.backend,
        kv_blocks = info.kv_blocks,
        block_size = info.block_size,
        "worker group ready"
    );
    let scheduler = SchedulerConfig {
        max_running: args.max_running,
        max_waiting: args.max_waiting,
        max_step_tokens: args.max_step_tokens,
        ..Default::default()
    };
    let handle = engine::start(info, scheduler, runner, make)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(handle, &args, tls.public))
}

async fn serve(
    handle: engine::EngineHandle,
    args: &ServeArgs,
    tls: Option<PublicTls>,
) -> Result<()> {
    let http = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port))
        .await
        .with_context(|| format!("binding HTTP on {}:{}", args.host, args.port))?;
    let grpc = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.grpc_port))
        .await
        .with_context(|| format!("binding gRPC on {}:{}", args.host, args.grpc_port))?;
    let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("OpenAI-compatible HTTP on {scheme}://{http_addr}/v1, gRPC on {grpc_addr}");
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "TESSERA_SERVE_READY http={http_addr} grpc={grpc_addr}"
    )?;
    stdout.flush()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let jobs = JobManager::new(handle.clone());
    let exempt = args.api_key_exempt.iter().filter(|e| !e.is_empty());
    let auth = ApiKeyAuth::new(args.api_key.clone(), exempt.cloned().collect())?;
    if auth.enabled() {
        tracing::info!(exempt = ?args.api_key_exempt, "API key required");
    }
    let router = tessera_coordinator::http::router(handle.clone(), auth.clone());
    let http_stop = stopped(stop_rx.clone());
    let http_task = match &tls {
        None => tokio::spawn(
            axum::serve(http, router)
                .with_graceful_shutdown(http_stop)
                .into_future(),
        ),
        Some(tls) => {
            let http = incoming::accept(http, tls.http_acceptor(), "HTTP API", FailureLog::Quiet);
            tokio::spawn(
                axum::serve(http, router)
                    .with_graceful_shutdown(http_stop)
                    .into_future(),
            )
        }
    };
    let api = GrpcApi {
        engine: handle.clone(),
        jobs,
        auth,
        tls: tls.as_ref().map(PublicTls::grpc_acceptor),
    };
    let grpc_task = tokio::spawn(tessera_coordinator::grpc::serve(
        api,
        grpc,
        stopped(stop_rx),
    ));
    shutdown_signal().await;
    drain(
        &handle,
        std::time::Duration::from_secs(args.drain_timeout_secs),
    )
    .await;
    handle.shutdown();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = http_task.await;
        let _ = grpc_task.await;
    })
    .await;
    Ok(())
}

/// Refuses new work and waits (up to `limit`, or until a second signal) for in-flight requests.
async fn drain(handle: &engine::EngineHandle, limit: std::time::Duration) {
    let pending = handle.begin_drain();
    tracing::info!(in_flight = pending, limit = ?limit, "shutting down: draining in-flight requests");
    let drained = async {
        while handle.in_flight() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(limit, drained) => {}
        _ = shutdown_signal() => tracing::warn!("second signal: not waiting any longer"),
    }
    match handle.in_flight() {
        0 => tracing::info!("drained"),
        n => tracing::warn!(failing = n, "drain deadline passed; failing what is left"),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

//! An embedded cluster: the coordinator starts `world` worker processes on loopback, assigns each
//! its shard, and drives steps over gRPC. Workers join each other's collective group (rank 0 is the
//! rendezvous) and die with the coordinator: killed when it drops them, and exiting by themselves
//! when their stdin (a pipe from the coordinator) closes, so even a SIGKILLed coordinator leaves no
//! orphans.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tessera_common::{ModelSpec, PlacementMap, load_model_spec};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_worker::WorkerError;
use tessera_worker::engine::EngineConfig;
use tessera_worker::executor::{SeqStep, StepResult, StepRunner};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// How long a worker may take to start and announce its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one step may take before the cluster reports it failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to launch.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// The `tessera` executable (the workers are `tessera worker` processes).
    pub exe: PathBuf,
    pub model_dir: PathBuf,
    pub world_size: usize,
    pub cache: EngineConfig,
    /// Where each expert runs; `None` places contiguous blocks of experts by rank.
    pub placement: Option<PlacementMap>,
}

pub struct LocalCluster {
    rt: tokio::runtime::Runtime,
    /// Held so the processes die with the cluster (`kill_on_drop`).
    children: Vec<Child>,
    clients: Vec<WorkerClient<Channel>>,
    spec: ModelSpec,
    step_id: u64,
}

fn remote(rank: usize, detail: impl std::fmt::Display) -> WorkerError {
    WorkerError::Remote {
        rank,
        detail: detail.to_string(),
    }
}

/// Starts one worker; returns it with its gRPC and collective addresses.
async fn start_worker(exe: &PathBuf, rank: usize) -> Result<(Child, String, String), WorkerError> {
    let mut child = Command::new(exe)
        .args(["worker", "--listen", "127.0.0.1:0", "--exit-with-stdin"])
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

impl LocalCluster {
    pub fn launch(opts: &LaunchOptions) -> Result<Self, WorkerError> {
        let spec = load_model_spec(&opts.model_dir)?;
        let world = opts.world_size.max(1);
        // Plan-time checks, before any process starts.
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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| remote(0, format!("cannot start the runtime: {e}")))?;
        let (children, clients) = rt.block_on(async {
            let mut children = Vec::new();
            let (mut grpc, mut collective) = (Vec::new(), Vec::new());
            for rank in 0..world {
                let (child, g, c) = start_worker(&opts.exe, rank).await?;
                children.push(child);
                grpc.push(g);
                collective.push(c);
            }
            let mut clients = Vec::new();
            for (rank, addr) in grpc.iter().enumerate() {
                clients.push(WorkerClient::connect(format!("http://{addr}")).await.map_err(|e| remote(rank, e))?);
            }
            let mut loads = tokio::task::JoinSet::new();
            for (rank, client) in clients.iter().enumerate() {
                let mut client = client.clone();
                let req = pb::LoadShardRequest {
                    model_dir: opts.model_dir.to_string_lossy().into_owned(),
                    shard: Some(assignment(&placement, rank)),
                    block_size: opts.cache.block_size as u32,
                    peer_addresses: collective.clone(),
                    kv_blocks: opts.cache.num_blocks as u64,
                };
                loads.spawn(async move { (rank, client.load_shard(req).await) });
            }
            while let Some(joined) = loads.join_next().await {
                let (rank, reply) = joined.map_err(|e| remote(0, e))?;
                let reply = reply.map_err(|s| remote(rank, s.message()))?.into_inner();
                tracing::info!(rank, backend = %reply.backend, mib = reply.weight_bytes >> 20, "worker loaded its shard");
            }
            Ok::<_, WorkerError>((children, clients))
        })?;
        Ok(LocalCluster {
            rt,
            children,
            clients,
            spec,
            step_id: 0,
        })
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

impl LocalCluster {
    /// Process ids of the workers, by rank.
    pub fn worker_pids(&self) -> Vec<Option<u32>> {
        self.children.iter().map(Child::id).collect()
    }
}

impl StepRunner for LocalCluster {
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
        self.rt.block_on(async move {
            let mut steps = tokio::task::JoinSet::new();
            for (rank, mut client) in clients.into_iter().enumerate() {
                let req = req.clone();
                steps.spawn(async move {
                    let reply = tokio::time::timeout(STEP_TIMEOUT, client.step(req)).await;
                    (rank, reply)
                });
            }
            let mut first = None;
            while let Some(joined) = steps.join_next().await {
                let (rank, reply) = joined.map_err(|e| remote(0, e))?;
                let reply = reply
                    .map_err(|_| remote(rank, format!("step timed out after {STEP_TIMEOUT:?}")))?
                    .map_err(|s| remote(rank, format!("step failed: {}", s.message())))?;
                if rank == 0 {
                    first = Some(reply.into_inner());
                }
            }
            first
                .map(StepResult::from)
                .ok_or_else(|| remote(0, "no reply"))
        })
    }

    fn release(&mut self, seq_id: u64) {
        let clients = self.clients.clone();
        self.rt.block_on(async move {
            for mut c in clients {
                // A failed release only leaks a sampler entry on that worker.
                let _ = c
                    .release(pb::ReleaseRequest {
                        seq_ids: vec![seq_id],
                    })
                    .await;
            }
        });
    }
}

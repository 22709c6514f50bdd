//! Tensor and expert parallelism inside one process: ranks run as threads joined by the in-process
//! collective. For every fixture, `--tp 2` and `--tp 3` (where the heads allow) must give the
//! greedy tokens of one rank, log-probabilities within 1e-4 of it, and still match transformers.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tessera_common::{AttentionSpec, ModelSpec, ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::WorkerError;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::collective::{Collective, InProcessGroup, TcpRank};
use tessera_worker::engine::{Engine, EngineConfig, GenerateOutput, GenerateRequest};
use tessera_worker::layers::TpContext;
use tessera_worker::model::Model;

/// Whether the attention heads of `spec` split over `world` ranks.
fn heads_allow(spec: &ModelSpec, world: usize) -> bool {
    spec.layers.iter().all(|l| match &l.attention {
        AttentionSpec::Gqa(a) => {
            a.num_heads.is_multiple_of(world)
                && (a.num_kv_heads.is_multiple_of(world) || world.is_multiple_of(a.num_kv_heads))
        }
        AttentionSpec::Mla(a) => a.num_heads.is_multiple_of(world),
    })
}

type Comm = Arc<dyn Collective<CpuBackend>>;

/// Runs `requests` on `world` in-process ranks; returns rank 0's outputs (all ranks must agree).
fn run(
    dir: &Path,
    world: usize,
    requests: &[GenerateRequest],
) -> Result<Vec<GenerateOutput>, WorkerError> {
    let group = InProcessGroup::new(world, Duration::from_secs(20));
    run_with(dir, world, requests, move |rank| {
        Ok(Arc::new(group.member(rank)) as Comm)
    })
}

/// Runs `requests` on `world` ranks, each joining the group through `connect(rank)` on its thread.
fn run_with(
    dir: &Path,
    world: usize,
    requests: &[GenerateRequest],
    connect: impl Fn(usize) -> Result<Comm, WorkerError> + Send + Sync + 'static,
) -> Result<Vec<GenerateOutput>, WorkerError> {
    let connect = Arc::new(connect);
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let connect = Arc::clone(&connect);
            let (dir, requests) = (dir.to_path_buf(), requests.to_vec());
            std::thread::spawn(move || -> Result<Vec<GenerateOutput>, WorkerError> {
                let comm = connect(rank)?;
                let spec = load_model_spec(&dir)?;
                let ckpt = Checkpoint::open(&dir)?;
                let tp = TpContext {
                    shard: ShardSpec {
                        rank,
                        world_size: world,
                        experts: None,
                    },
                    comm,
                };
                let model = Model::load_rank(CpuBackend, spec, &ckpt, tp)?;
                let mut engine = Engine::new(model, EngineConfig::default())?;
                requests
                    .iter()
                    .map(|r| engine.generate(r, |_| {}))
                    .collect()
            })
        })
        .collect();
    let mut outputs: Vec<Vec<GenerateOutput>> = Vec::new();
    for handle in ranks {
        outputs.push(handle.join().expect("rank thread")?);
    }
    for (rank, out) in outputs.iter().enumerate().skip(1) {
        assert_eq!(out, &outputs[0], "rank {rank} disagrees with rank 0");
    }
    Ok(outputs.swap_remove(0))
}

fn requests(reference: &common::Reference) -> Vec<GenerateRequest> {
    reference
        .cases
        .iter()
        .map(|c| GenerateRequest {
            prompt_logprobs: true,
            ..common::greedy_request(c)
        })
        .collect()
}

#[test]
fn tp2_and_tp3_match_one_rank_and_transformers() {
    let mut sharded_runs = 0;
    for (name, dir) in common::fixtures() {
        let reference = common::reference(&dir);
        let reqs = requests(&reference);
        let single = run(&dir, 1, &reqs).unwrap();
        let spec = load_model_spec(&dir).unwrap();
        for world in [2, 3] {
            if !heads_allow(&spec, world) {
                let err =
                    run(&dir, world, &reqs[..1]).expect_err("an unsplittable plan is an error");
                assert!(err.to_string().contains("heads"), "{name} tp{world}: {err}");
                continue;
            }
            sharded_runs += 1;
            let sharded = run(&dir, world, &reqs).unwrap();
            for ((s, t), case) in single.iter().zip(&sharded).zip(&reference.cases) {
                assert_eq!(t.token_ids, s.token_ids, "{name} tp{world}");
                assert_eq!(
                    t.token_ids, case.greedy_ids,
                    "{name} tp{world} vs transformers"
                );
                let worst = s
                    .logprobs
                    .iter()
                    .zip(&t.logprobs)
                    .chain(
                        s.prompt_logprobs
                            .iter()
                            .flatten()
                            .zip(t.prompt_logprobs.iter().flatten()),
                    )
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1e-4,
                    "{name} tp{world}: |Δ logprob| {worst:.2e} vs one rank"
                );
                for (a, b) in t.logprobs.iter().zip(&case.greedy_logprobs) {
                    assert!(
                        (a - b).abs() <= common::tolerance(&reference.dtype),
                        "{name} tp{world}: {a} vs {b}"
                    );
                }
            }
        }
    }
    assert!(
        sharded_runs >= 8,
        "too few fixtures ran sharded: {sharded_runs}"
    );
}

#[test]
fn ranks_in_separate_sockets_match_one_rank() {
    let dir = common::fixtures_dir().join("deepseek_v3");
    let reference = common::reference(&dir);
    let reqs = requests(&reference);
    let single = run(&dir, 1, &reqs).unwrap();
    let listener = std::sync::Mutex::new(Some(std::net::TcpListener::bind("127.0.0.1:0").unwrap()));
    let addr = listener
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .local_addr()
        .unwrap();
    let timeout = Duration::from_secs(20);
    let tcp = run_with(&dir, 2, &reqs, move |rank| {
        let comm: Comm = match rank {
            0 => Arc::new(TcpRank::root(
                listener.lock().unwrap().take().unwrap(),
                2,
                timeout,
            )?),
            r => Arc::new(TcpRank::join(r, 2, addr, timeout)?),
        };
        Ok(comm)
    })
    .unwrap();
    for (s, t) in single.iter().zip(&tcp) {
        assert_eq!(s.token_ids, t.token_ids);
        for (a, b) in s.logprobs.iter().zip(&t.logprobs) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
    }
}

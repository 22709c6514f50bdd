//! The embedded cluster under faults: real worker processes on loopback, one of them killed.

mod common;

use std::time::{Duration, Instant};

use tessera_common::PlacementMap;
use tessera_coordinator::cluster::{LaunchOptions, LocalCluster};
use tessera_worker::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_worker::sampling::SamplingParams;

fn request(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: vec![3, 4, 5],
        max_tokens,
        sampling: SamplingParams::greedy(),
        top_logprobs: 0,
        prompt_logprobs: false,
        stop_token_ids: vec![],
    }
}

#[test]
fn a_killed_worker_fails_the_next_step_quickly_and_processes_are_reaped() {
    let cache = EngineConfig {
        block_size: 16,
        num_blocks: 8,
    };
    let opts = LaunchOptions {
        exe: env!("CARGO_BIN_EXE_tessera").into(),
        model_dir: common::fixtures_dir().join("deepseek_v3"),
        world_size: 2,
        cache,
        kv_cache_bytes: None,
        placement: None,
        step_timeout: tessera_coordinator::cluster::DEFAULT_STEP_TIMEOUT,
        cluster_tls: None,
        device: Default::default(),
        limits: Default::default(),
    };
    let cluster = LocalCluster::launch(&opts).unwrap();
    let pids: Vec<u32> = cluster.worker_pids().into_iter().flatten().collect();
    assert_eq!(pids.len(), 2);
    let mut engine = Engine::with_runner(cluster, cache);
    assert_eq!(
        engine
            .generate(&request(4), |_| {})
            .unwrap()
            .token_ids
            .len(),
        4
    );

    // SIGKILL rank 1 mid-generation: the step in flight (or the next) must fail within 5 s.
    let victim = pids[1];
    let started = Instant::now();
    let err = engine
        .generate(&request(60), |n| {
            if n > 0
                && std::process::Command::new("kill")
                    .args(["-9", &victim.to_string()])
                    .status()
                    .is_ok()
            {}
        })
        .expect_err("generation must fail once a worker is dead");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("worker"), "{err}");

    // Dropping the cluster kills and reaps the remaining worker.
    drop(engine);
    std::thread::sleep(Duration::from_millis(300));
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "worker {pid} still running"
        );
    }
}

#[test]
fn an_explicit_placement_with_an_idle_rank_gives_the_same_tokens() {
    let dir = common::fixtures_dir().join("deepseek_v3");
    let spec = tessera_common::load_model_spec(&dir).unwrap();
    let mut placement = PlacementMap::contiguous(&spec, 2);
    // Every expert on rank 1: rank 0 runs attention and dense parts only.
    placement
        .layers
        .iter_mut()
        .for_each(|l| l.ranks.iter_mut().for_each(|r| *r = 1));
    assert_eq!(placement.experts_per_rank()[0], 0);
    let cache = EngineConfig {
        block_size: 16,
        num_blocks: 8,
    };
    let opts = LaunchOptions {
        exe: env!("CARGO_BIN_EXE_tessera").into(),
        model_dir: dir.clone(),
        world_size: 2,
        cache,
        kv_cache_bytes: None,
        placement: Some(placement),
        step_timeout: tessera_coordinator::cluster::DEFAULT_STEP_TIMEOUT,
        cluster_tls: None,
        device: Default::default(),
        limits: Default::default(),
    };
    let mut engine = Engine::with_runner(LocalCluster::launch(&opts).unwrap(), cache);
    let reference = common::reference(&dir);
    let case = &reference.cases[0];
    let req = GenerateRequest {
        prompt: case.prompt_ids.clone(),
        ..request(case.greedy_ids.len())
    };
    assert_eq!(
        engine.generate(&req, |_| {}).unwrap().token_ids,
        case.greedy_ids
    );
}

//! Sizing the KV cache from GPU memory (`--gpu-memory-utilization`) after profiling the largest
//! step (`tessera_worker::profile`): the cache takes what the weights and the measured activations
//! leave, and the largest step the limits allow, with every row's logits, then runs beside a full
//! cache within what the profile measured, as do the decode graphs. A tensor-parallel rank
//! profiles without waiting for its peers. A step the device cannot hold fails the load with the
//! flags that shrink it named.
//!
//! Skipped with a visible message where there is no GPU. CI runs it on the CPU emulator of the
//! CUDA libraries (`tests/cuda-emulator`), which accounts device memory as a GPU with memory
//! pools does, on a device of [`EMULATED_MIB`] so that the cache it fills stays small.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::Backend;
use tessera_kernels::cuda::CudaBackend;
use tessera_worker::collective::TcpRank;
use tessera_worker::device::{
    Device, DeviceConfig, DeviceKind, ExecutorPlan, GroupLink, KvSize, LoadedExecutor,
    load_executor,
};
use tessera_worker::executor::SeqStep;
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::layers::MlaPrefill;
use tessera_worker::profile::{PROFILE_MARGIN_BYTES, StepLimits};
use tessera_worker::sampling::SamplingParams;

/// The emulated device's memory: room for the weights, the margin and a small cache.
const EMULATED_MIB: &str = "512";

const BLOCK_SIZE: usize = 4;

/// 96 tokens over 8 sequences: 12 each, inside the fixtures' 128 positions.
const LIMITS: StepLimits = StepLimits {
    max_step_tokens: 96,
    max_seqs: 8,
};

fn load(dir: &std::path::Path, graphs: usize) -> LoadedExecutor {
    load_rank(dir, graphs, ShardSpec::whole(), GroupLink::Single).expect("the model loads")
}

fn load_rank(
    dir: &std::path::Path,
    graphs: usize,
    shard: ShardSpec,
    link: GroupLink,
) -> Result<LoadedExecutor, tessera_worker::WorkerError> {
    load_limited(dir, graphs, shard, link, LIMITS)
}

fn load_limited(
    dir: &std::path::Path,
    graphs: usize,
    shard: ShardSpec,
    link: GroupLink,
    limits: StepLimits,
) -> Result<LoadedExecutor, tessera_worker::WorkerError> {
    let cfg = DeviceConfig {
        kind: DeviceKind::Cuda { ordinal: Some(0) },
        ..DeviceConfig::default()
    };
    let plan = ExecutorPlan {
        dir,
        shard,
        link,
        kv: KvSize::Auto {
            gpu_memory_utilization: 1.0,
        },
        block_size: BLOCK_SIZE,
        metrics: None,
        cuda_graph_max_batch: graphs,
        limits,
        mla_prefill: MlaPrefill::Auto,
    };
    load_executor(Device::open(&cfg).expect("the GPU opens"), plan)
}

/// Rank 0 of two profiles while rank 1, joined over TCP, is still loading (it never calls a
/// collective): the profile rehearses the group's collectives instead of waiting for the peer,
/// which would fail the load after the 2 s collective timeout.
fn a_tensor_parallel_rank_profiles_alone(dir: &std::path::Path, vocab: usize) {
    let timeout = Duration::from_secs(2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let rank = TcpRank::join(1, 2, addr, timeout).expect("rank 1 joins");
        // "Loading" until rank 0 is done.
        let _ = loaded_rx.recv();
        drop(rank);
    });
    let root = TcpRank::root(listener, 2, timeout).expect("rank 0 forms the group");
    let shard = ShardSpec {
        rank: 0,
        world_size: 2,
        experts: None,
    };
    let loaded = load_rank(dir, 8, shard, GroupLink::Host(Arc::new(root)));
    drop(loaded_tx);
    peer.join().unwrap();
    let p = loaded
        .expect("a rank loads without waiting for its peer")
        .profile
        .expect("profiled");
    assert_eq!((p.tokens, p.seqs), (96, 8), "{p:?}");
    // Its decode steps run eagerly: no graph.
    assert_eq!((p.graph_batch, p.graph_bytes), (0, 0), "{p:?}");
    // The logits are gathered to the whole vocabulary, as the group's all-gather gives.
    assert!(p.pool_bytes >= (96 * vocab * 4) as u64, "{p:?}");
}

/// The largest step `LIMITS` allow, as a scheduler would send it: 8 prompts of 12 tokens, each
/// with prompt logprobs (every row's logits to the host).
fn largest(alloc: &mut BlockAllocator, vocab: u32) -> Vec<SeqStep> {
    let per = LIMITS.max_step_tokens / LIMITS.max_seqs;
    (0..LIMITS.max_seqs as u64)
        .map(|id| SeqStep {
            seq_id: id,
            tokens: (0..per as u32)
                .map(|t| (t * 7 + id as u32) % vocab)
                .collect(),
            context_len: per,
            block_table: alloc.allocate(alloc.blocks_for(per + 4)).unwrap(),
            sampling: SamplingParams::default(),
            top_logprobs: 0,
            prompt_logprobs: true,
            sample: true,
            prompt_len: per,
        })
        .collect()
}

#[test]
fn the_kv_cache_leaves_room_for_the_largest_step_it_measured() {
    // SAFETY: the only test of this binary, run before any other thread exists; the emulator
    // reads its device size on every query, and a real driver ignores the variable.
    unsafe { std::env::set_var("TESSERA_EMU_MEMORY_MIB", EMULATED_MIB) };
    let probe = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIPPED: the_kv_cache_leaves_room_for_the_largest_step_it_measured: {e}");
            return;
        }
    };
    if probe.memory_use().unwrap().is_none() {
        eprintln!("SKIPPED: the device has no memory pools: the flat reserve applies");
        return;
    }
    let dir = common::fixtures_dir().join("qwen3_moe");
    let vocab = load_model_spec(&dir).unwrap().vocab_size;

    let loaded = load(&dir, 8);
    let p = loaded.profile.expect("a GPU with memory pools is profiled");
    assert_eq!((p.tokens, p.seqs), (96, 8), "{p:?}");
    // Every row's f32 logits are alive at once: the measurement cannot be less.
    let logits = (96 * vocab * 4) as u64;
    assert!(p.pool_bytes >= logits, "{p:?} < {logits} bytes of logits");
    assert_eq!(
        p.graph_batch, 8,
        "the largest graphed batch is the most sequences"
    );
    assert!(p.graph_bytes > 0, "{p:?}");

    // The cache took the rest: what is free now is the reserve, give or take a block (exactly,
    // on the emulator) or the pool's rounding of each layer's allocation (on a GPU).
    let mem = probe.device_memory().unwrap();
    let reserve = p.reserve_bytes();
    let emulated = probe.name().contains("Tessera CUDA emulator");
    let slack = if emulated { 4 << 20 } else { 64 << 20 };
    assert!(
        mem.free + slack >= reserve && mem.free < reserve + slack,
        "free {} bytes after the cache, reserve {reserve} ({p:?})",
        mem.free
    );
    let weights = loaded.weight_bytes;
    let mut runner = loaded.runner;
    let blocks = runner.num_blocks();
    assert!(
        blocks * BLOCK_SIZE > 10_000,
        "{blocks} blocks: the cache should fill the emulated device"
    );

    // The largest step and graphed decode steps grow the allocators by no more than measured.
    probe.trim_memory().unwrap();
    let before = probe.memory_use().unwrap().unwrap();
    let mut alloc = BlockAllocator::new(blocks, BLOCK_SIZE);
    let mut steps = largest(&mut alloc, vocab as u32);
    let mut out = runner
        .step(&steps)
        .expect("the largest step runs beside the full cache");
    for _ in 0..3 {
        for (s, r) in steps.iter_mut().zip(&out.results) {
            s.tokens = vec![r.token.expect("a sampled token")];
            s.context_len += 1;
            s.prompt_logprobs = false;
        }
        out = runner.step(&steps).expect("a decode step runs");
    }
    assert_eq!(
        runner.graph_stats().replays,
        2,
        "{:?}",
        runner.graph_stats()
    );
    let after = probe.memory_use().unwrap().unwrap();
    assert!(
        after.pool_peak - before.pool <= p.pool_bytes,
        "the pool grew {} bytes, the profile measured {} ({before:?} then {after:?})",
        after.pool_peak - before.pool,
        p.pool_bytes
    );
    assert!(
        after.graphs_peak - before.graphs <= p.graph_bytes,
        "graphs took {} bytes, the profile measured {}",
        after.graphs_peak - before.graphs,
        p.graph_bytes
    );
    drop(runner);

    // Without graphs nothing is captured, and the margin alone stands for them.
    let eager = load(&dir, 0).profile.unwrap();
    assert_eq!((eager.graph_bytes, eager.graph_batch), (0, 0), "{eager:?}");
    assert_eq!(
        eager.reserve_bytes(),
        eager.pool_bytes + PROFILE_MARGIN_BYTES
    );

    a_tensor_parallel_rank_profiles_alone(&dir, vocab);
    if emulated {
        a_step_larger_than_the_device_is_a_clear_error(&probe, &dir, weights);
    }
}

/// On a device with room for the weights but not for the largest step the limits allow, the
/// load fails with the step and the flags that shrink it named, before any cache is allocated.
fn a_step_larger_than_the_device_is_a_clear_error(
    probe: &CudaBackend,
    dir: &std::path::Path,
    weights: u64,
) {
    let huge = StepLimits {
        max_step_tokens: 8192,
        max_seqs: 64,
    };
    // What this process still holds (the probe's context) stays in use: room beside it for the
    // weights and 4 MiB.
    probe.trim_memory().unwrap();
    let mem = probe.device_memory().unwrap();
    let mib = (mem.total - mem.free + weights).div_ceil(1 << 20) + 4;
    // SAFETY: as above; the tensor-parallel peer thread has been joined.
    unsafe { std::env::set_var("TESSERA_EMU_MEMORY_MIB", mib.to_string()) };
    let err = load_limited(dir, 8, ShardSpec::whole(), GroupLink::Single, huge)
        .err()
        .expect("the largest step does not fit");
    let msg = err.to_string();
    assert!(
        msg.contains("8192 tokens over 64 sequences") && msg.contains("--max-step-tokens"),
        "{msg}"
    );
}

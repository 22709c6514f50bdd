//! The GPU roofline (`tessera bench --roofline --device cuda`): decode tokens/s at each batch size
//! against the GPU's memory bandwidth.
//!
//! Decode at small batches streams every weight it touches from HBM once per step, so its roof is
//! `bandwidth / weight bytes per step`. Each step's bytes come from its own routing decisions
//! (which experts any token chose, [`WeightFootprint::step_bytes`]), so the fraction reached is
//! `weight bytes per step / median step time / peak bandwidth`: at batch 1 exactly "active
//! weight bytes per token ÷ time per token ÷ peak". Two bandwidths are reported: the data-sheet
//! peak from the driver's memory clock and bus width (the denominator of the fraction), and a
//! measured device-to-device copy, the most a streaming kernel reaches in practice.
//!
//! The model runs through the production path (`load_executor`, `Executor::step` over the paged
//! KV cache, greedy sampling), as the CPU roofline does; every step ends with the logits copied to
//! the host, so wall-clock step times include all of the GPU's work.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tessera_common::{ShardSpec, load_model_spec};
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::device::{
    Device, DeviceConfig, ExecutorPlan, GroupLink, KvSize, load_executor,
};
use tessera_worker::footprint::WeightFootprint;
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::profile::StepLimits;

use super::BenchArgs;
use super::roofline::{
    DecodeTiming, ModelInfo, RunOutcome, RunPlan, git_commit, model_info, run_batch,
};

/// Positions per KV-cache block (the engine's default).
const BLOCK_SIZE: usize = 16;
/// Bytes of each device-copy probe (far above any cache) and its repetitions (the best counts).
const COPY_PROBE_BYTES: usize = 1 << 30;
const COPY_PROBE_REPS: usize = 5;

#[derive(Debug, Serialize)]
pub struct GpuInfo {
    /// e.g. "cuda:0 (NVIDIA H100 80GB HBM3)".
    pub name: String,
    pub memory_total_gib: f64,
    /// `2 × memory clock × bus width` from the driver (10⁹ bytes/s); `None` if not reported.
    pub peak_bandwidth_gb_s: Option<f64>,
    /// Best device-to-device copy, bytes read plus written, before and after the run.
    pub copy_bandwidth_gb_s: [f64; 2],
}

#[derive(Debug, Serialize)]
pub struct GpuBatch {
    #[serde(flatten)]
    pub timing: DecodeTiming,
    /// `weight_bytes_per_step / median step time` (10⁹ bytes/s).
    pub weight_gb_s: f64,
    /// `weight_gb_s / peak`: the fraction of HBM bandwidth reached.
    pub hbm_fraction: Option<f64>,
    /// `weight_gb_s / measured copy bandwidth`.
    pub copy_fraction: f64,
    /// Kernels and cuBLAS calls queued per decode step (median). Each costs the host a few
    /// microseconds to launch, so `launches × that ≥ step time` means the step is bound by
    /// launching (what CUDA graphs remove), not by the GPU. A step replayed from a graph
    /// counts one launch for the graph.
    pub launches_per_step: u64,
    /// The same batch with every step launched eagerly (`--cuda-graph-max-batch 0`), measured in
    /// the same run; `None` when graphs were off anyway.
    pub eager: Option<EagerBatch>,
}

/// One prompt prefilled with the default kernels and with each tensor-core path swapped for its
/// predecessor, in the same run (`--prefill-compare-len`): the best of `--rounds` prefills each,
/// in turn.
#[derive(Debug, Serialize)]
pub struct PrefillCompare {
    pub prompt_len: usize,
    /// Prompt tokens/s with the defaults: tensor-core attention and MoE kernels.
    pub tensor_cores_tok_s: f64,
    /// With `--prefill-attention paged` (the decode attention kernels).
    pub paged_attention_tok_s: f64,
    /// With the MoE experts as cuBLAS products per expert (after a copy of the per-expert
    /// offsets to the host) instead of the tensor-core grouped kernels.
    pub cublas_moe_tok_s: f64,
    /// `tensor_cores_tok_s / paged_attention_tok_s`.
    pub attention_speedup: f64,
    /// `tensor_cores_tok_s / cublas_moe_tok_s`.
    pub moe_speedup: f64,
}

/// A batch decoded without graphs, beside the graphed run.
#[derive(Debug, Serialize)]
pub struct EagerBatch {
    pub tok_s: f64,
    pub step_ms_median: f64,
    pub launches_per_step: u64,
    /// Graphed tokens/s ÷ eager tokens/s.
    pub graph_speedup: f64,
}

#[derive(Debug, Serialize)]
pub struct GpuRoofline {
    pub commit: Option<String>,
    pub gpu: GpuInfo,
    pub model: ModelInfo,
    pub active_bytes_per_token: u64,
    /// `peak / active_bytes_per_token`: batch-1 decode's ceiling.
    pub roofline_tok_s_batch1: Option<f64>,
    /// Batch size (as a string) → decode tokens per second.
    pub decode_tok_s: BTreeMap<String, f64>,
    pub batches: Vec<GpuBatch>,
    pub kv_blocks: usize,
    pub prompt_len: usize,
    /// `--mla-prefill`: the form latent attention took (ignored without it).
    pub mla_prefill: super::MlaPrefillArg,
    pub timed_steps: usize,
    pub rounds: usize,
    /// The prefill kernels' comparison; `None` with `--prefill-compare-len 0`.
    pub prefill_compare: Option<PrefillCompare>,
    /// Decode graphs over the graphed runs: a refused capture (the driver would not hold some
    /// step) leaves its shape eager, which the graphed column then measures.
    pub graphs: GraphCounts,
}

/// [`tessera_worker::graphs::GraphStats`] summed over the graphed runs.
#[derive(Debug, Default, Serialize)]
pub struct GraphCounts {
    pub captures: u64,
    pub replays: u64,
    pub refused: u64,
}

pub fn run(args: &BenchArgs) -> Result<GpuRoofline> {
    let cfg = DeviceConfig {
        kind: args.device,
        cuda_graph_max_batch: args.cuda_graph_max_batch,
        ..DeviceConfig::default()
    };
    let Device::Cuda(gpu) = Device::open(&cfg)? else {
        bail!(
            "--device {}: the GPU roofline needs a CUDA device (use --device cpu for the CPU one)",
            args.device
        );
    };
    let name = tessera_kernels::Backend::name(&gpu);
    let memory_total_gib = tessera_kernels::Backend::device_memory(&gpu)
        .map_or(0.0, |m| m.total as f64 / (1u64 << 30) as f64);
    let peak = gpu.peak_bandwidth_gb_s();
    tracing::info!(%name, ?peak, "measuring device copy bandwidth");
    let copy_before = gpu.copy_bandwidth_gb_s(COPY_PROBE_BYTES, COPY_PROBE_REPS)?;

    let (dir, generated): (PathBuf, bool) = args.checkpoint()?;
    let spec = load_model_spec(&dir)
        .with_context(|| format!("reading the model config in {}", dir.display()))?;
    let ckpt = Checkpoint::open(&dir)?;
    let mut info = model_info(&spec, &ckpt, &dir, generated);
    let footprint = WeightFootprint::of_loaded(&spec, &ckpt)?;
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let positions = args.prompt_len + args.warmup + args.tokens + 1;
    if positions > spec.max_position_embeddings {
        bail!(
            "--prompt-len + --warmup + --tokens = {positions} exceeds the model's {} positions",
            spec.max_position_embeddings
        );
    }
    // The comparison's prompt, its one decode step and the position after it.
    let compare_positions = args.prefill_compare_len + 2;
    if args.prefill_compare_len > 0 && compare_positions > spec.max_position_embeddings {
        bail!(
            "--prefill-compare-len {} exceeds the model's {} positions",
            args.prefill_compare_len,
            spec.max_position_embeddings
        );
    }
    let num_blocks =
        (max_batch * positions.div_ceil(BLOCK_SIZE)).max(compare_positions.div_ceil(BLOCK_SIZE));
    let loading = Instant::now();
    let plan = ExecutorPlan {
        dir: &dir,
        shard: ShardSpec::whole(),
        link: GroupLink::Single,
        kv: KvSize::Blocks(num_blocks),
        block_size: BLOCK_SIZE,
        metrics: None,
        cuda_graph_max_batch: cfg.cuda_graph_max_batch,
        // Every batch prefills its prompts in one step, as does the comparison's prompt.
        limits: StepLimits {
            max_step_tokens: (max_batch * args.prompt_len.max(1)).max(args.prefill_compare_len),
            max_seqs: max_batch,
        },
        mla_prefill: args.mla_prefill.into(),
    };
    let launches = gpu.launch_counter();
    let switches = [gpu.tensor_core_prefill(), gpu.tensor_core_moe()];
    let mut exec = load_executor(Device::Cuda(gpu), plan)?.runner;
    info.load_seconds = loading.elapsed().as_secs_f64();
    let mut alloc = BlockAllocator::new(num_blocks, BLOCK_SIZE);

    // Each batch twice per round: with graphs (unless they are off), then every step eager.
    let graphs = cfg.cuda_graph_max_batch;
    let modes: &[usize] = if graphs > 0 { &[graphs, 0] } else { &[0] };
    let mut runs: Vec<(usize, Vec<RunOutcome>)> = args
        .batches
        .iter()
        .map(|&b| (b, modes.iter().map(|_| RunOutcome::default()).collect()))
        .collect();
    let mut graph_counts = GraphCounts::default();
    for round in 0..args.rounds {
        for (batch, merged) in &mut runs {
            for (mode, merged) in modes.iter().zip(merged.iter_mut()) {
                tracing::info!(
                    round,
                    batch = *batch,
                    steps = args.tokens,
                    graph_max_batch = *mode,
                    "decoding on the GPU"
                );
                exec.set_graph_max_batch(*mode);
                let plan = RunPlan {
                    batch: *batch,
                    prompt_len: args.prompt_len,
                    warmup: args.warmup,
                    steps: args.tokens,
                    vocab: spec.vocab_size,
                    footprint: &footprint,
                    profile: false,
                    launches: Some(&launches),
                };
                merged.merge(run_batch(&mut exec, &mut alloc, &plan)?);
                // Read before the next mode drops this run's graphs.
                let st = exec.graph_stats();
                graph_counts.captures += st.captures;
                graph_counts.replays += st.replays;
                graph_counts.refused += st.refused;
            }
        }
    }
    let prefill_compare = (args.prefill_compare_len > 0)
        .then(|| {
            let runs = CompareRuns {
                prompt_len: args.prefill_compare_len,
                rounds: args.rounds,
                vocab: spec.vocab_size,
                footprint: &footprint,
            };
            compare_prefill(&mut exec, &mut alloc, &switches, &runs)
        })
        .transpose()?;
    let kv_blocks = exec.num_blocks();
    drop(exec);
    // A fresh handle for the closing probe: the executor (and its memory) is gone.
    let Device::Cuda(gpu) = Device::open(&cfg)? else {
        bail!("--device {}: the GPU went away during the run", args.device);
    };
    let copy_after = gpu.copy_bandwidth_gb_s(COPY_PROBE_BYTES, COPY_PROBE_REPS)?;
    let copy = copy_before.max(copy_after);

    let mut batches = Vec::new();
    let mut decode_tok_s = BTreeMap::new();
    for (batch, outcomes) in runs {
        let o = &outcomes[0];
        let timing = o.timing(batch, args.prompt_len);
        let eager = (outcomes.len() > 1).then(|| {
            let e = outcomes[1].timing(batch, args.prompt_len);
            EagerBatch {
                tok_s: e.tok_s,
                step_ms_median: e.step_ms_median,
                launches_per_step: median_u64(&outcomes[1].step_launches),
                graph_speedup: timing.tok_s / e.tok_s,
            }
        });
        let weight_gb_s = timing.weight_bytes_per_step / (timing.step_ms_median / 1e3) / 1e9;
        decode_tok_s.insert(batch.to_string(), timing.tok_s);
        batches.push(GpuBatch {
            timing,
            weight_gb_s,
            hbm_fraction: peak.map(|p| weight_gb_s / p),
            copy_fraction: weight_gb_s / copy,
            launches_per_step: median_u64(&o.step_launches),
            eager,
        });
    }
    let active = footprint.active_bytes_per_token();
    Ok(GpuRoofline {
        commit: git_commit(),
        gpu: GpuInfo {
            name,
            memory_total_gib,
            peak_bandwidth_gb_s: peak,
            copy_bandwidth_gb_s: [copy_before, copy_after],
        },
        model: info,
        active_bytes_per_token: active,
        roofline_tok_s_batch1: peak.map(|p| p * 1e9 / active.max(1) as f64),
        decode_tok_s,
        batches,
        kv_blocks,
        prompt_len: args.prompt_len,
        mla_prefill: args.mla_prefill,
        timed_steps: args.tokens,
        rounds: args.rounds,
        prefill_compare,
        graphs: graph_counts,
    })
}

/// What [`compare_prefill`] runs: one prompt of `prompt_len` tokens, `rounds` times per kind.
struct CompareRuns<'a> {
    prompt_len: usize,
    rounds: usize,
    vocab: usize,
    footprint: &'a WeightFootprint,
}

/// Prefills one prompt with every tensor-core switch on, then with each of `switches` (the
/// backend's [`CudaBackend::tensor_core_prefill`] and [`CudaBackend::tensor_core_moe`]) off in
/// turn; leaves them on.
///
/// [`CudaBackend::tensor_core_prefill`]: tessera_kernels::cuda::CudaBackend::tensor_core_prefill
/// [`CudaBackend::tensor_core_moe`]: tessera_kernels::cuda::CudaBackend::tensor_core_moe
fn compare_prefill(
    exec: &mut Box<dyn tessera_worker::executor::StepRunner + Send>,
    alloc: &mut BlockAllocator,
    switches: &[Arc<AtomicBool>; 2],
    c: &CompareRuns<'_>,
) -> Result<PrefillCompare> {
    // None: every switch on; Some(i): switch i off.
    let settings = [None, Some(0), Some(1)];
    let mut best = [f64::INFINITY; 3];
    for round in 0..c.rounds {
        for (off, best) in settings.into_iter().zip(best.iter_mut()) {
            tracing::info!(round, tokens = c.prompt_len, ?off, "prefilling");
            for (i, s) in switches.iter().enumerate() {
                s.store(off != Some(i), Ordering::Relaxed);
            }
            let plan = RunPlan {
                batch: 1,
                prompt_len: c.prompt_len,
                warmup: 0,
                steps: 1,
                vocab: c.vocab,
                footprint: c.footprint,
                profile: false,
                launches: None,
            };
            let outcome = run_batch(exec, alloc, &plan);
            for s in switches {
                s.store(true, Ordering::Relaxed);
            }
            *best = best.min(outcome?.prefill_secs);
        }
    }
    let [tc, paged, cublas] = best.map(|secs| c.prompt_len as f64 / secs);
    Ok(PrefillCompare {
        prompt_len: c.prompt_len,
        tensor_cores_tok_s: tc,
        paged_attention_tok_s: paged,
        cublas_moe_tok_s: cublas,
        attention_speedup: tc / paged,
        moe_speedup: tc / cublas,
    })
}

/// The median of `v` (the lower middle for an even count); 0 when empty.
fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

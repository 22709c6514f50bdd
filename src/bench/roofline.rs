//! The roofline measurement: bandwidth probes around decode runs at each batch size.
//!
//! Batch-1 decode reads every active weight once per token, so its ceiling is
//! `bandwidth / active_bytes_per_token`. At batch B a step reads the dense weights once, one
//! embedding row per token and every expert that any of the B tokens chose; the step's own routing
//! decisions (reported by the executor) give those bytes exactly, so each batch size gets its own
//! memory roof too.
//!
//! On a shared machine other tenants' bursts come and go within seconds, so the sweep over batch
//! sizes runs `--rounds` times with a bandwidth probe before each round and one after the last.
//! The roof is the best probe of the whole run (interference can lower the decode numbers, never
//! the roof), and tokens/s comes from the median step time over all rounds, so a burst that stalls
//! a few steps does not decide the result; the mean (`tok_s_mean`) and each round's batch-1 figure
//! are reported beside it to show the spread.
//!
//! Decoding goes through the production path: `Checkpoint::open`, `load_model_spec`,
//! `Model::load`, and [`Executor::step`] over the paged KV cache, B sequences per step, greedy
//! sampling of every token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tessera_common::{FfnSpec, ModelSpec, ShardSpec, load_model_spec};
use tessera_kernels::cpu::probe::{self, Bandwidth};
use tessera_kernels::cpu::{self, CpuBackend, profile};
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::executor::{Executor, SeqStep, StepRunner};
use tessera_worker::footprint::WeightFootprint;
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::layers::MlaPolicy;
use tessera_worker::model::Model;
use tessera_worker::sampling::SamplingParams;

use super::BenchArgs;

/// Positions per KV-cache block (the engine's default).
const BLOCK_SIZE: usize = 16;
/// Repetitions of each bandwidth probe (the best counts).
const PROBE_REPS: usize = 5;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    /// Threads in the compute pool.
    pub threads: usize,
    pub logical_cpus: usize,
    /// The matrix kernels this CPU runs.
    pub kernels: String,
    /// `/proc/loadavg`'s 1-minute load before and after the run (other processes' activity).
    pub load_average: [Option<f64>; 2],
}

#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub dir: PathBuf,
    /// Whether this run generated the synthetic checkpoint (false: reused or user-supplied).
    pub generated: bool,
    pub architecture: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub experts: Option<usize>,
    pub top_k: Option<usize>,
    pub weight_dtypes: Vec<String>,
    pub total_weight_bytes: u64,
    pub load_seconds: f64,
}

/// How decoding went at one batch size, on any device (the CPU and GPU reports both carry it).
#[derive(Debug, Serialize)]
pub struct DecodeTiming {
    pub batch: usize,
    /// `batch / median step time` over the timed steps of every round.
    pub tok_s: f64,
    /// `batch × steps / total time`: what stalls from other processes drag down.
    pub tok_s_mean: f64,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    /// Prompt tokens per second of the (single-step) prefill of all sequences.
    pub prefill_tok_s: f64,
    /// Mean weight bytes a timed step read, from the steps' routing.
    pub weight_bytes_per_step: f64,
}

/// Decode at one batch size.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    #[serde(flatten)]
    pub timing: DecodeTiming,
    /// `batch × bandwidth / weight_bytes_per_step`: this batch size's memory roof.
    pub memory_roof_tok_s: f64,
    /// `peak FLOP/s / (2 × multiply-adds per token)`: the compute roof (any batch).
    pub compute_roof_tok_s: Option<f64>,
    /// The lower of the two roofs.
    pub roofline_tok_s: f64,
    /// "memory" or "compute": which roof is lower.
    pub bound_by: &'static str,
    pub roofline_fraction: f64,
    pub speedup_vs_batch1: Option<f64>,
    /// This batch's roof over batch 1's: the most batching could gain here.
    pub speedup_ceiling_vs_batch1: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ProfileEntry {
    pub op: String,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
    pub share: f64,
}

#[derive(Debug, Serialize)]
pub struct Profile {
    /// Sequences per profiled step.
    pub batch: usize,
    pub step_ms: f64,
    /// Step time outside the backend's operations (step assembly, sampling, bookkeeping).
    pub outside_ops_ms: f64,
    /// One empty parallel region of the compute pool, measured alone (microseconds).
    pub fork_join_us: f64,
    pub ops: Vec<ProfileEntry>,
}

#[derive(Debug, Serialize)]
pub struct Roofline {
    pub commit: Option<String>,
    pub machine: Machine,
    pub model: ModelInfo,
    /// The read roof used below (GB/s = 10⁹ bytes/s): the best read probe of the run.
    pub bandwidth_gb_s: f64,
    /// The first probe (before any decoding).
    pub bandwidth_before: Bandwidth,
    /// The last probe (after every round).
    pub bandwidth_after: Bandwidth,
    /// The best read rate of every probe in order: before each round, then after the last.
    pub bandwidth_probes_gb_s: Vec<f64>,
    /// Peak multiply-add throughput of all threads (10⁹ FLOP/s), best before or after; `None`
    /// with the portable kernels.
    pub fma_peak_gflops: Option<f64>,
    pub active_bytes_per_token: u64,
    /// Weight multiply-adds per decoded token.
    pub macs_per_token: u64,
    /// `bandwidth / active_bytes_per_token`.
    pub roofline_tok_s_batch1: f64,
    /// Batch size (as a string) → decode tokens per second.
    pub decode_tok_s: BTreeMap<String, f64>,
    pub roofline_fraction_batch1: Option<f64>,
    /// Batch-1 decode as a fraction of the roofline, each round on its own (median step of the
    /// round): how much the figure above moves with the machine's other load.
    pub roofline_fraction_batch1_by_round: Vec<f64>,
    pub batches: Vec<BatchResult>,
    pub prompt_len: usize,
    /// `--mla-prefill`: the form latent attention took (ignored without it).
    pub mla_prefill: super::MlaPrefillArg,
    /// Timed steps per batch size and round.
    pub timed_steps: usize,
    pub rounds: usize,
    pub profile: Option<Profile>,
}

pub(super) fn git_commit() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub(super) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A deterministic, varied prompt for sequence `seq` (distinct sequences route differently).
pub(super) fn prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| {
            let h = ((seq * 7919 + i * 104_729 + 13) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((h >> 33) % vocab as u64) as u32
        })
        .collect()
}

pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// What a batch run needs besides the executor.
pub(super) struct RunPlan<'a> {
    pub(super) batch: usize,
    pub(super) prompt_len: usize,
    pub(super) warmup: usize,
    pub(super) steps: usize,
    pub(super) vocab: usize,
    pub(super) footprint: &'a WeightFootprint,
    /// Turn the backend profile on for the timed steps.
    pub(super) profile: bool,
    /// The backend's launch counter, where it has one (the GPU's), read around each timed step.
    pub(super) launches: Option<&'a AtomicU64>,
}

#[derive(Default)]
pub(super) struct RunOutcome {
    pub(super) step_secs: Vec<f64>,
    pub(super) step_bytes: Vec<u64>,
    /// Kernel launches of each timed step, where [`RunPlan::launches`] counts them.
    pub(super) step_launches: Vec<u64>,
    /// The fastest prefill of the runs merged here.
    pub(super) prefill_secs: f64,
}

impl RunOutcome {
    /// The timing of these steps, `batch` sequences each with `prompt_len` prompt tokens.
    pub(super) fn timing(&self, batch: usize, prompt_len: usize) -> DecodeTiming {
        let step = median(&self.step_secs);
        let total: f64 = self.step_secs.iter().sum();
        let bytes =
            self.step_bytes.iter().sum::<u64>() as f64 / self.step_bytes.len().max(1) as f64;
        DecodeTiming {
            batch,
            tok_s: batch as f64 / step,
            tok_s_mean: (batch * self.step_secs.len()) as f64 / total,
            step_ms_median: step * 1e3,
            step_ms_min: self.step_secs.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
            prefill_tok_s: (batch * prompt_len) as f64 / self.prefill_secs,
            weight_bytes_per_step: bytes,
        }
    }

    /// Adds another run's steps (a later round at the same batch size).
    pub(super) fn merge(&mut self, other: RunOutcome) {
        self.step_secs.extend(other.step_secs);
        self.step_bytes.extend(other.step_bytes);
        self.step_launches.extend(other.step_launches);
        self.prefill_secs = if self.prefill_secs > 0.0 {
            self.prefill_secs.min(other.prefill_secs)
        } else {
            other.prefill_secs
        };
    }
}

/// Prefills `batch` sequences in one step, then decodes them together.
pub(super) fn run_batch(
    exec: &mut impl StepRunner,
    alloc: &mut BlockAllocator,
    p: &RunPlan<'_>,
) -> Result<RunOutcome> {
    let positions = p.prompt_len + p.warmup + p.steps + 1;
    let mut seqs: Vec<SeqStep> = Vec::with_capacity(p.batch);
    for s in 0..p.batch {
        let blocks = alloc.allocate(alloc.blocks_for(positions))?;
        let tokens = prompt(s, p.prompt_len, p.vocab);
        seqs.push(SeqStep {
            seq_id: s as u64,
            context_len: tokens.len(),
            tokens,
            block_table: blocks,
            sampling: SamplingParams::greedy(),
            top_logprobs: 0,
            prompt_logprobs: false,
            sample: true,
            prompt_len: p.prompt_len,
        });
    }
    let started = Instant::now();
    let mut result = exec.step(&seqs)?;
    let prefill_secs = started.elapsed().as_secs_f64();
    let mut out = RunOutcome {
        step_secs: Vec::with_capacity(p.steps),
        step_bytes: Vec::with_capacity(p.steps),
        step_launches: Vec::new(),
        prefill_secs,
    };
    let launched = || p.launches.map(|c| c.load(Ordering::Relaxed));
    for i in 0..p.warmup + p.steps {
        for (s, r) in seqs.iter_mut().zip(&result.results) {
            let token = r.token.context("the step sampled no token")?;
            s.tokens.clear();
            s.tokens.push(token);
            s.context_len += 1;
        }
        let timed = i >= p.warmup;
        if timed && p.profile {
            profile::enable(true);
        }
        let before = launched();
        let started = Instant::now();
        result = exec.step(&seqs)?;
        let secs = started.elapsed().as_secs_f64();
        profile::enable(false);
        if timed {
            if let (Some(a), Some(b)) = (before, launched()) {
                out.step_launches.push(b - a);
            }
            out.step_secs.push(secs);
            out.step_bytes
                .push(p.footprint.step_bytes(p.batch, &result.expert_counts));
        }
    }
    for s in seqs {
        exec.release(&[s.seq_id]);
        alloc.release(s.block_table);
    }
    Ok(out)
}

pub(super) fn model_info(
    spec: &ModelSpec,
    ckpt: &Checkpoint,
    dir: &Path,
    generated: bool,
) -> ModelInfo {
    let moe = spec.layers.iter().find_map(|l| match &l.ffn {
        FfnSpec::Moe(m) => Some((m.num_experts, m.top_k)),
        FfnSpec::Dense(_) => None,
    });
    let mut dtypes: Vec<String> = ckpt
        .names()
        .iter()
        .filter_map(|n| ckpt.info(n).ok())
        .map(|i| i.dtype.to_string())
        .collect::<std::collections::BTreeSet<String>>()
        .into_iter()
        .collect();
    dtypes.sort();
    ModelInfo {
        dir: dir.to_path_buf(),
        generated,
        architecture: spec.architecture.clone(),
        layers: spec.layers.len(),
        hidden_size: spec.hidden_size,
        vocab_size: spec.vocab_size,
        experts: moe.map(|m| m.0),
        top_k: moe.map(|m| m.1),
        weight_dtypes: dtypes,
        total_weight_bytes: ckpt.total_bytes(),
        load_seconds: 0.0,
    }
}

pub fn run(args: &BenchArgs) -> Result<Roofline> {
    let load_before = load_average();
    let probe_bytes = args.bandwidth_mib << 20;
    tracing::info!(mib = args.bandwidth_mib, "measuring memory bandwidth");
    let bandwidth_before = probe::bandwidth(probe_bytes, PROBE_REPS);
    let peak_before = probe::fma_peak_gflops(PROBE_REPS);

    let (dir, generated) = args.checkpoint()?;
    let spec = load_model_spec(&dir)
        .with_context(|| format!("reading the model config in {}", dir.display()))?;
    let ckpt = Checkpoint::open(&dir)?;
    let loading = Instant::now();
    let mut model = Model::load(CpuBackend, spec.clone(), &ckpt, &ShardSpec::whole())?;
    let mut info = model_info(&spec, &ckpt, &dir, generated);
    info.load_seconds = loading.elapsed().as_secs_f64();
    let footprint = WeightFootprint::of_loaded(&spec, &ckpt)?;

    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let positions = args.prompt_len + args.warmup + args.tokens + 1;
    if positions > spec.max_position_embeddings {
        anyhow::bail!(
            "--prompt-len + --warmup + --tokens = {positions} exceeds the model's {} positions",
            spec.max_position_embeddings
        );
    }
    let per_seq = positions.div_ceil(BLOCK_SIZE);
    let num_blocks = max_batch * per_seq;
    // Every batch prefills its prompts in one step, expanded (where it is cheaper) whatever
    // the batch.
    model.set_mla_policy(MlaPolicy {
        prefill: args.mla_prefill.into(),
        max_context_rows: max_batch * args.prompt_len,
    });
    let mut exec = Executor::new(model, num_blocks, BLOCK_SIZE)?;
    let mut alloc = BlockAllocator::new(num_blocks, BLOCK_SIZE);
    let kernels = cpu::kernels_name().to_string();

    let plan = |batch: usize, profile: bool| RunPlan {
        batch,
        prompt_len: args.prompt_len,
        warmup: args.warmup,
        steps: args.tokens,
        vocab: spec.vocab_size,
        footprint: &footprint,
        profile,
        launches: None,
    };
    let mut probes = vec![bandwidth_before];
    let mut runs: Vec<(usize, RunOutcome)> = args
        .batches
        .iter()
        .map(|&b| (b, RunOutcome::default()))
        .collect();
    let mut batch1_by_round = Vec::new();
    for round in 0..args.rounds {
        if round > 0 {
            tracing::info!(round, "measuring memory bandwidth");
            probes.push(probe::bandwidth(probe_bytes, PROBE_REPS));
        }
        for (batch, merged) in &mut runs {
            tracing::info!(round, batch = *batch, steps = args.tokens, "decoding");
            let outcome = run_batch(&mut exec, &mut alloc, &plan(*batch, false))?;
            if *batch == 1 {
                batch1_by_round.push(1.0 / median(&outcome.step_secs));
            }
            merged.merge(outcome);
        }
    }
    let profile = if let Some(batch) = args.profile {
        tracing::info!(batch, steps = args.tokens, "profiling decode");
        profile::take();
        let outcome = run_batch(&mut exec, &mut alloc, &plan(batch, true))?;
        Some(summarise_profile(batch, &outcome, profile::take()))
    } else {
        None
    };

    tracing::info!("measuring memory bandwidth again");
    probes.push(probe::bandwidth(probe_bytes, PROBE_REPS));
    let peak = match (peak_before, probe::fma_peak_gflops(PROBE_REPS)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let best = probes
        .iter()
        .copied()
        .fold(bandwidth_before, Bandwidth::max);
    let bw = best.read_gb_s() * 1e9;
    let active = footprint.active_bytes_per_token();
    let macs = footprint.macs_per_token();
    let compute_roof = peak.map(|p| p * 1e9 / (2.0 * macs.max(1) as f64));

    let mut batches = Vec::new();
    let mut decode_tok_s = BTreeMap::new();
    let mut batch1 = None;
    for (batch, o) in runs {
        let timing = o.timing(batch, args.prompt_len);
        let tok_s = timing.tok_s;
        let memory_roof = batch as f64 * bw / timing.weight_bytes_per_step;
        let (roof, bound_by) = match compute_roof {
            Some(c) if c < memory_roof => (c, "compute"),
            _ => (memory_roof, "memory"),
        };
        if batch == 1 {
            batch1 = Some(tok_s);
        }
        decode_tok_s.insert(batch.to_string(), tok_s);
        batches.push(BatchResult {
            timing,
            memory_roof_tok_s: memory_roof,
            compute_roof_tok_s: compute_roof,
            roofline_tok_s: roof,
            bound_by,
            roofline_fraction: tok_s / roof,
            speedup_vs_batch1: None,
            speedup_ceiling_vs_batch1: None,
        });
    }
    let roof_b1 = batches
        .iter()
        .find(|b| b.timing.batch == 1)
        .map(|b| b.roofline_tok_s);
    for b in &mut batches {
        b.speedup_vs_batch1 = batch1.map(|one| b.timing.tok_s / one);
        b.speedup_ceiling_vs_batch1 = roof_b1.map(|one| b.roofline_tok_s / one);
    }
    let roof1 = bw / active as f64;
    Ok(Roofline {
        commit: git_commit(),
        machine: Machine {
            cpu: cpu_name(),
            threads: cpu::threads(),
            logical_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernels,
            load_average: [load_before, load_average()],
        },
        model: info,
        bandwidth_gb_s: bw / 1e9,
        bandwidth_before,
        bandwidth_after: *probes.last().unwrap_or(&bandwidth_before),
        bandwidth_probes_gb_s: probes.iter().map(Bandwidth::read_gb_s).collect(),
        fma_peak_gflops: peak,
        active_bytes_per_token: active,
        macs_per_token: macs,
        roofline_tok_s_batch1: roof1,
        decode_tok_s,
        roofline_fraction_batch1: batch1.map(|t| t / roof1),
        roofline_fraction_batch1_by_round: batch1_by_round.iter().map(|t| t / roof1).collect(),
        batches,
        prompt_len: args.prompt_len,
        mla_prefill: args.mla_prefill,
        timed_steps: args.tokens,
        rounds: args.rounds,
        profile,
    })
}

fn summarise_profile(batch: usize, o: &RunOutcome, ops: Vec<profile::OpTime>) -> Profile {
    let steps = o.step_secs.len().max(1) as f64;
    let step_total: f64 = o.step_secs.iter().sum();
    let in_ops: f64 = ops.iter().map(|t| t.seconds).sum();
    Profile {
        batch,
        step_ms: step_total / steps * 1e3,
        outside_ops_ms: (step_total - in_ops).max(0.0) / steps * 1e3,
        fork_join_us: profile::fork_join_us(),
        ops: ops
            .into_iter()
            .map(|t| ProfileEntry {
                calls_per_step: t.calls as f64 / steps,
                ms_per_step: t.seconds / steps * 1e3,
                share: t.seconds / step_total.max(1e-12),
                op: t.op,
            })
            .collect(),
    }
}

//! `tessera bench`: performance measurements.
//!
//! `--roofline` measures this machine's memory bandwidth and the decode speed of a ~1B-parameter
//! MoE model (generated once and cached) at several batch sizes, and states batch-1 decode as a
//! fraction of the bandwidth roofline ([`roofline`]). Without `--roofline` it is a load generator
//! against a running server (`--url`, [`crate::loadgen`]).

mod gpu;
mod report;
mod roofline;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use tessera_worker::synthetic::SyntheticModel;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub load: crate::loadgen::LoadArgs,
    /// Roofline report: memory bandwidth, decode tokens/s at each batch size, and batch-1 decode
    /// as a fraction of bandwidth ÷ weight bytes read per token.
    #[arg(long)]
    pub roofline: bool,
    /// Print exactly one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Folder of the synthetic checkpoint: reused if it holds one of this shape and seed, generated
    /// there if missing. Default: qwen3-moe-SIZE-seedN under $XDG_CACHE_HOME/tessera/bench (or
    /// ~/.cache/tessera/bench, or the temp dir).
    #[arg(long, env = "TESSERA_BENCH_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Measure this Hugging Face model folder instead of a synthetic checkpoint.
    #[arg(long, env = "TESSERA_BENCH_MODEL", conflicts_with = "checkpoint_dir")]
    pub model: Option<PathBuf>,
    /// Shape of the synthetic model.
    #[arg(long, value_enum, default_value_t = ModelSize::Qwen3Moe1b, env = "TESSERA_BENCH_MODEL_SIZE")]
    pub model_size: ModelSize,
    /// Keep only this many decoder layers of the synthetic model (e.g. to fit a large shape on
    /// one GPU); tokens/s and the roofline then describe that many layers. Default: the shape's.
    #[arg(long, env = "TESSERA_BENCH_LAYERS")]
    pub layers: Option<usize>,
    /// Device of the roofline run: `cpu` (bandwidth and FMA probes of this machine) or `cuda` /
    /// `cuda:N` (HBM: the driver's peak and a measured device copy).
    #[arg(long, default_value = "cpu", env = "TESSERA_BENCH_DEVICE")]
    pub device: tessera_worker::device::DeviceKind,
    /// GPU roofline: largest decode batch replayed from a CUDA graph. Each batch size is then
    /// measured twice in the same run, with graphs and with every step launched eagerly, and the
    /// report gives the ratio; 0 measures eager steps only.
    #[arg(
        long,
        default_value_t = tessera_worker::graphs::DEFAULT_MAX_BATCH,
        env = "TESSERA_BENCH_CUDA_GRAPH_MAX_BATCH"
    )]
    pub cuda_graph_max_batch: usize,
    /// Batch sizes to decode at (sequences decoding together), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4,16,64",
        env = "TESSERA_BENCH_BATCHES"
    )]
    pub batches: Vec<usize>,
    /// Decode steps timed at each batch size, per round.
    #[arg(long, default_value_t = 32, env = "TESSERA_BENCH_TOKENS")]
    pub tokens: usize,
    /// Times the whole sweep over batch sizes runs, each after a fresh bandwidth probe; tokens/s
    /// is taken from the median step over all rounds, so other processes' bursts on a shared
    /// machine do not decide it.
    #[arg(long, default_value_t = 3, env = "TESSERA_BENCH_ROUNDS")]
    pub rounds: usize,
    /// Untimed decode steps before the timed ones (with CUDA graphs, at least 2: a batch shape
    /// runs eagerly on its first step and is captured on its second).
    #[arg(long, default_value_t = 2, env = "TESSERA_BENCH_WARMUP")]
    pub warmup: usize,
    /// Prompt tokens prefilled per sequence before decoding.
    #[arg(long, default_value_t = 16, env = "TESSERA_BENCH_PROMPT_LEN")]
    pub prompt_len: usize,
    /// MiB read by each memory-bandwidth probe (well above the last-level cache).
    #[arg(long, default_value_t = 512, env = "TESSERA_BENCH_BANDWIDTH_MIB")]
    pub bandwidth_mib: usize,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0, env = "TESSERA_BENCH_SEED")]
    pub seed: u64,
    /// How latent attention (MLA, DeepSeek shapes) attends: `auto` picks per sequence (a
    /// prompt is expanded into per-head keys and values, decode stays absorbed in the latent
    /// space); `absorbed` or `expanded` forces one form, to compare prefill/s in each. Ignored
    /// by other attention.
    #[arg(long, value_enum, default_value_t = MlaPrefillArg::Auto, env = "TESSERA_BENCH_MLA_PREFILL")]
    pub mla_prefill: MlaPrefillArg,
    /// GPU roofline: after the decode sweep, prefill one prompt of this many tokens with the
    /// default (tensor-core) kernels, with the paged attention kernels (`--prefill-attention
    /// paged`) and with cuBLAS per expert for the MoE layers, each `--rounds` times, and report
    /// the three and the ratios; 0 skips it.
    #[arg(
        long,
        default_value_t = 2048,
        env = "TESSERA_BENCH_PREFILL_COMPARE_LEN"
    )]
    pub prefill_compare_len: usize,
    /// Also time each backend operation during extra decode steps at this batch size (1 if given
    /// without a value) and report where the time goes.
    #[arg(long, env = "TESSERA_BENCH_PROFILE", num_args = 0..=1, default_missing_value = "1")]
    pub profile: Option<usize>,
}

/// `--mla-prefill`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MlaPrefillArg {
    Auto,
    Absorbed,
    Expanded,
}

impl From<MlaPrefillArg> for tessera_worker::layers::MlaPrefill {
    fn from(a: MlaPrefillArg) -> Self {
        match a {
            MlaPrefillArg::Auto => Self::Auto,
            MlaPrefillArg::Absorbed => Self::Absorbed,
            MlaPrefillArg::Expanded => Self::Expanded,
        }
    }
}

/// Synthetic model shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelSize {
    /// ~1.04B parameters (2.1 GB bf16), Qwen3-MoE layout: 12 layers, hidden 1024, 64 experts, top-8.
    #[value(name = "1b")]
    Qwen3Moe1b,
    /// A few hundred KB: for tests.
    #[value(name = "tiny")]
    Tiny,
    /// Qwen3-30B-A3B's shape: 48 layers, hidden 2048, 128 experts of width 768, top-8 (61 GB
    /// bf16; use --layers to keep fewer).
    #[value(name = "qwen3-30b-a3b")]
    Qwen3_30bA3b,
    /// Mixtral-8x7B's shape: 32 layers, hidden 4096, 8 experts of width 14336, top-2 (93 GB
    /// bf16; use --layers to keep fewer).
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
    /// DeepSeek-V2-Lite's shape: 27 layers, hidden 2048, MLA (latent 512, 16 heads), 64 experts
    /// of width 1408 top-6 plus 2 shared, a dense first layer (31 GB bf16).
    #[value(name = "deepseek-v2-lite")]
    DeepseekV2Lite,
}

impl ModelSize {
    /// The preset's name in [`SyntheticModel::preset`] and the cache.
    pub fn name(self) -> &'static str {
        match self {
            ModelSize::Qwen3Moe1b => "1b",
            ModelSize::Tiny => "tiny",
            ModelSize::Qwen3_30bA3b => "qwen3-30b-a3b",
            ModelSize::Mixtral8x7b => "mixtral-8x7b",
            ModelSize::DeepseekV2Lite => "deepseek-v2-lite",
        }
    }
}

impl BenchArgs {
    /// The synthetic model the flags describe, and its cache name (the layer count is part of
    /// it when --layers changes the shape).
    pub fn synthetic(&self) -> Result<(SyntheticModel, String)> {
        let name = self.model_size.name();
        let Some(model) = SyntheticModel::preset(name) else {
            bail!("no synthetic preset named {name}");
        };
        Ok(match self.layers {
            Some(0) => bail!("--layers must be at least 1"),
            Some(n) if n != model.num_layers => (model.with_layers(n), format!("{name}-{n}l")),
            _ => (model, name.to_string()),
        })
    }

    /// The checkpoint folder: --model, or the synthetic one (generated on first use).
    pub fn checkpoint(&self) -> Result<(PathBuf, bool)> {
        if let Some(dir) = &self.model {
            return Ok((dir.clone(), false));
        }
        let (model, name) = self.synthetic()?;
        let dir = self
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| tessera_worker::synthetic::cache_dir(&name, self.seed));
        Ok(tessera_worker::synthetic::ensure_checkpoint(
            &dir, &model, self.seed,
        )?)
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !args.roofline {
        return crate::loadgen::run(&args.load, args.json);
    }
    if args.batches.is_empty() || args.batches.contains(&0) {
        bail!("--batches must list batch sizes of at least 1");
    }
    if args.tokens == 0 || args.prompt_len == 0 || args.rounds == 0 {
        bail!("--tokens, --prompt-len and --rounds must be at least 1");
    }
    if args.device != tessera_worker::device::DeviceKind::Cpu {
        let result = gpu::run(&args)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            print!("{}", report::gpu_table(&result));
        }
        return Ok(());
    }
    let result = roofline::run(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", report::table(&result));
    }
    Ok(())
}

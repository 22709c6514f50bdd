//! `tessera bench`: performance measurements.
//!
//! `--roofline` measures this machine's memory bandwidth and the decode speed of a ~1B-parameter
//! MoE model (generated once and cached) at several batch sizes, and states batch-1 decode as a
//! fraction of the bandwidth roofline ([`roofline`]). Without `--roofline` it is a load generator
//! against a running server (`--url`, [`crate::loadgen`]).

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
    /// Untimed decode steps before the timed ones.
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
    /// Also time each backend operation during extra decode steps at this batch size (1 if given
    /// without a value) and report where the time goes.
    #[arg(long, env = "TESSERA_BENCH_PROFILE", num_args = 0..=1, default_missing_value = "1")]
    pub profile: Option<usize>,
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
}

impl ModelSize {
    pub fn model(self) -> SyntheticModel {
        match self {
            ModelSize::Qwen3Moe1b => SyntheticModel::qwen3_moe_1b(),
            ModelSize::Tiny => SyntheticModel::tiny(),
        }
    }

    /// The preset's name in [`SyntheticModel::preset`] and the cache.
    pub fn name(self) -> &'static str {
        match self {
            ModelSize::Qwen3Moe1b => "1b",
            ModelSize::Tiny => "tiny",
        }
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
    let result = roofline::run(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", report::table(&result));
    }
    Ok(())
}

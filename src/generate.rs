//! `tessera generate`: one prompt through a local model, streamed to the terminal or printed as one
//! JSON object (`--json`) for tools and tests.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tessera_common::{GenerationConfig, ShardSpec, load_model_spec};
use tessera_coordinator::cluster::{LaunchOptions, LocalCluster};
use tessera_coordinator::tokenizer::{IncrementalDecoder, Tokenizer};
use tessera_worker::device::{Device, ExecutorPlan, GroupLink, KvSize, load_executor};
use tessera_worker::engine::{Engine, EngineConfig, GenerateOutput, GenerateRequest};
use tessera_worker::executor::StepRunner;
use tessera_worker::layers::MlaPrefill;
use tessera_worker::profile::StepLimits;
use tessera_worker::sampling::SamplingParams;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model folder: config.json, *.safetensors, optional tokenizer.json and
    /// generation_config.json. Default: the demo model shipped in models/tessera-demo.
    #[arg(long, env = "TESSERA_MODEL")]
    model: Option<PathBuf>,
    /// Prompt text (needs the folder's tokenizer.json). Default: "A fool and his money".
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate; generation also stops at the model's eos tokens.
    #[arg(long, default_value_t = 64, env = "TESSERA_MAX_TOKENS")]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: generation_config.json's, else 1.0.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    /// Default: generation_config.json's, else 1.0.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off). Default: generation_config.json's, else 0.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed for sampling, making a sampled generation reproducible.
    #[arg(long)]
    seed: Option<u64>,
    /// Also report the K most likely tokens and their log-probabilities at each step.
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Also report log p(prompt[i] | prompt[..i]) for every prompt token.
    #[arg(long)]
    prompt_logprobs: bool,
    /// Print exactly one JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Tensor-parallel world size: with N > 1, an embedded cluster of N worker processes on
    /// loopback runs the model (heads and MLP columns split, experts placed in blocks).
    #[arg(long, default_value_t = 1, env = "TESSERA_TP")]
    tp: usize,
    /// Positions per KV-cache block.
    #[arg(long, default_value_t = 16, env = "TESSERA_BLOCK_SIZE")]
    block_size: usize,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let dir = &crate::demo::model_or_default(args.model.clone())?;
    let spec = load_model_spec(dir)
        .with_context(|| format!("reading the model config in {}", dir.display()))?;
    let gen_config = GenerationConfig::load(dir)?;
    let tokenizer = Tokenizer::load(dir)?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => {
            let Some(tok) = &tokenizer else {
                bail!(
                    "--prompt needs {}/tokenizer.json; pass --prompt-ids instead",
                    dir.display()
                );
            };
            tok.encode(text, true)?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => match &tokenizer {
            Some(tok) => tok.encode(crate::demo::DEFAULT_PROMPT, true)?,
            None => bail!("give --prompt-ids: {} has no tokenizer.json", dir.display()),
        },
    };
    if args.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let mut stop_token_ids = gen_config.eos_token_ids();
    for id in &spec.eos_token_ids {
        if !stop_token_ids.contains(id) {
            stop_token_ids.push(*id);
        }
    }
    let sampling = SamplingParams {
        temperature: args.temperature.or(gen_config.temperature).unwrap_or(1.0),
        top_p: args.top_p.or(gen_config.top_p).unwrap_or(1.0),
        top_k: args
            .top_k
            .or(gen_config.top_k.map(|k| k as usize))
            .unwrap_or(0),
        seed: args.seed,
        ..SamplingParams::default()
    };
    let request = GenerateRequest {
        max_tokens: args.max_tokens,
        sampling,
        top_logprobs: args.logprobs,
        prompt_logprobs: args.prompt_logprobs,
        stop_token_ids,
        prompt,
    };
    request.validate(&spec)?;
    let blocks = (request.prompt.len() + request.max_tokens).div_ceil(args.block_size);
    let cache = EngineConfig {
        block_size: args.block_size,
        num_blocks: blocks,
    };
    if args.tp == 0 {
        bail!("--tp must be at least 1");
    }
    if args.tp > 1 {
        let launch = LaunchOptions {
            limits: Default::default(),
            exe: std::env::current_exe().context("locating the tessera executable")?,
            model_dir: dir.clone(),
            world_size: args.tp,
            cache,
            kv_cache_bytes: None,
            placement: None,
            step_timeout: tessera_coordinator::cluster::DEFAULT_STEP_TIMEOUT,
            cluster_tls: None,
            device: args.device.config(0),
        };
        let cluster = LocalCluster::launch(&launch)?;
        return finish(
            Engine::with_runner(cluster, cache),
            &request,
            tokenizer.as_ref(),
            &args,
        );
    }
    let device = args.device.config(0);
    let plan = ExecutorPlan {
        dir,
        shard: ShardSpec::whole(),
        link: GroupLink::Single,
        kv: KvSize::Blocks(cache.num_blocks),
        block_size: cache.block_size,
        metrics: None,
        cuda_graph_max_batch: device.cuda_graph_max_batch,
        // One request: its prompt is one step.
        limits: StepLimits {
            max_step_tokens: request.prompt.len(),
            max_seqs: 1,
        },
        mla_prefill: MlaPrefill::Auto,
    };
    let runner = load_executor(Device::open(&device)?, plan)?.runner;
    tracing::info!(device = %runner.backend(), "generating");
    finish(
        Engine::with_runner(runner, cache),
        &request,
        tokenizer.as_ref(),
        &args,
    )
}

/// Runs the request and prints the result as `args` asks.
fn finish<R: StepRunner>(
    mut engine: Engine<R>,
    request: &GenerateRequest,
    tokenizer: Option<&Tokenizer>,
    args: &GenerateArgs,
) -> Result<()> {
    let started = Instant::now();
    let output = if args.json {
        engine.generate(request, |_| {})?
    } else {
        stream(&mut engine, request, tokenizer)?
    };
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", to_json(&output, tokenizer, args)?);
    } else {
        eprintln!(
            "\n[{} tokens in {:.2}s, {:.1} tokens/s, finish: {}]",
            output.token_ids.len(),
            secs,
            output.token_ids.len() as f64 / secs.max(1e-9),
            output.finish_reason.as_str()
        );
    }
    Ok(())
}

/// Generates while printing text deltas (or ids, without a tokenizer) as they arrive.
fn stream(
    engine: &mut Engine<impl StepRunner>,
    request: &GenerateRequest,
    tokenizer: Option<&Tokenizer>,
) -> Result<GenerateOutput> {
    let mut stdout = std::io::stdout().lock();
    let mut decoder = tokenizer.map(|t| (t, IncrementalDecoder::new()));
    let mut failure = None;
    let output = engine.generate(request, |id| {
        let piece = match decoder.as_mut() {
            Some((t, d)) => d.push(t, id).unwrap_or_else(|e| {
                failure.get_or_insert(e);
                String::new()
            }),
            None => format!("{id} "),
        };
        // A closed stdout (e.g. `| head`) must not abort generation mid-way.
        let _ = stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush());
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    if let Some((t, d)) = decoder {
        let _ = write!(stdout, "{}", d.finish(t)?);
    }
    let _ = writeln!(stdout);
    Ok(output)
}

fn to_json(
    out: &GenerateOutput,
    tokenizer: Option<&Tokenizer>,
    args: &GenerateArgs,
) -> Result<Value> {
    let mut obj = json!({
        "token_ids": out.token_ids,
        "logprobs": out.logprobs,
        "finish_reason": out.finish_reason.as_str(),
    });
    if let Some(tok) = tokenizer {
        obj["text"] = json!(tok.decode(&out.token_ids, true)?);
    }
    if args.logprobs > 0 {
        obj["top_logprobs"] = json!(out.top_logprobs);
    }
    if args.prompt_logprobs {
        obj["prompt_logprobs"] = json!(out.prompt_logprobs);
    }
    Ok(obj)
}

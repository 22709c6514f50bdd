//! Single-process generation: prefill the prompt in one step, then decode token by token from the
//! KV cache (a step never recomputes the prompt). The cluster's scheduler batches many of these;
//! this engine serves `tessera generate` and the correctness tests.

use tessera_common::ModelSpec;
use tessera_kernels::Backend;

use crate::WorkerError;
use crate::executor::{Executor, SeqStep, StepRunner};
use crate::kv_cache::BlockAllocator;
use crate::model::Model;
use crate::sampling::SamplingParams;

/// Cache geometry of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the pool (a request needs `ceil((prompt + max_tokens) / block_size)`).
    pub num_blocks: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_blocks: 256,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Most tokens to generate (the stop token counts).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Also report this many most likely tokens per step.
    pub top_logprobs: usize,
    /// Also report `log p(prompt[i] | prompt[..i])`.
    pub prompt_logprobs: bool,
    /// Generation ends after any of these.
    pub stop_token_ids: Vec<u32>,
}

impl GenerateRequest {
    /// Checks the request against the model before any work (or weight loading) is done.
    pub fn validate(&self, spec: &ModelSpec) -> Result<(), WorkerError> {
        let req = self;
        if req.prompt.is_empty() {
            return Err(WorkerError::Request("prompt is empty".into()));
        }
        if let Some(bad) = req
            .prompt
            .iter()
            .chain(&req.stop_token_ids)
            .find(|t| **t as usize >= spec.vocab_size)
        {
            return Err(WorkerError::Request(format!(
                "token id {bad} is outside the vocabulary ({})",
                spec.vocab_size
            )));
        }
        if req.max_tokens == 0 {
            return Err(WorkerError::Request("max_tokens must be at least 1".into()));
        }
        let total = req.prompt.len() + req.max_tokens;
        if total > spec.max_position_embeddings {
            return Err(WorkerError::Request(format!(
                "prompt ({}) + max_tokens ({}) = {total} exceeds the model's context of {} positions",
                req.prompt.len(),
                req.max_tokens,
                spec.max_position_embeddings
            )));
        }
        req.sampling.validate().map_err(WorkerError::Request)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// Per generated token, the most likely alternatives (empty unless asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// `None` for the first prompt token (empty unless asked for).
    pub prompt_logprobs: Vec<Option<f32>>,
    pub finish_reason: FinishReason,
}

/// Generation loop over any [`StepRunner`]: a local executor, or a cluster of workers.
pub struct Engine<R: StepRunner> {
    executor: R,
    blocks: BlockAllocator,
    next_seq: u64,
}

impl<B: Backend> Engine<Executor<B>> {
    /// An engine running `model` in this process.
    pub fn new(model: Model<B>, config: EngineConfig) -> Result<Self, WorkerError> {
        Ok(Self::with_runner(
            Executor::new(model, config.num_blocks, config.block_size)?,
            config,
        ))
    }
}

impl<R: StepRunner> Engine<R> {
    /// An engine driving `runner`, whose KV pool has `config`'s geometry.
    pub fn with_runner(runner: R, config: EngineConfig) -> Self {
        Engine {
            executor: runner,
            blocks: BlockAllocator::new(config.num_blocks, config.block_size),
            next_seq: 0,
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        self.executor.spec()
    }

    /// Generates for one request, calling `on_token` with each new token as it is chosen.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput, WorkerError> {
        req.validate(self.executor.spec())?;
        let blocks = self
            .blocks
            .allocate(self.blocks.blocks_for(req.prompt.len() + req.max_tokens))?;
        let seq_id = self.next_seq;
        self.next_seq += 1;
        let result = self.run(req, seq_id, &blocks, &mut on_token);
        self.executor.release(&[seq_id]);
        self.blocks.release(blocks);
        result
    }

    fn run(
        &mut self,
        req: &GenerateRequest,
        seq_id: u64,
        blocks: &[u32],
        on_token: &mut dyn FnMut(u32),
    ) -> Result<GenerateOutput, WorkerError> {
        let mut out = GenerateOutput {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            finish_reason: FinishReason::Length,
        };
        let mut step = SeqStep {
            seq_id,
            tokens: req.prompt.clone(),
            context_len: req.prompt.len(),
            block_table: blocks.to_vec(),
            sampling: req.sampling.clone(),
            top_logprobs: req.top_logprobs,
            prompt_logprobs: req.prompt_logprobs,
            sample: true,
            prompt_len: req.prompt.len(),
        };
        loop {
            let result = self
                .executor
                .step(std::slice::from_ref(&step))?
                .results
                .swap_remove(0);
            if step.prompt_logprobs {
                out.prompt_logprobs = result.prompt_logprobs;
            }
            let token = result
                .token
                .ok_or_else(|| WorkerError::Request("the step sampled no token".into()))?;
            out.token_ids.push(token);
            out.logprobs.push(result.logprob);
            if req.top_logprobs > 0 {
                out.top_logprobs.push(result.top_logprobs);
            }
            on_token(token);
            if req.stop_token_ids.contains(&token) {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            if out.token_ids.len() >= req.max_tokens {
                break;
            }
            // Decode: feed only the new token; the prompt's keys and values are in the cache.
            step.tokens = vec![token];
            step.context_len += 1;
            step.prompt_logprobs = false;
        }
        Ok(out)
    }
}

//! Single-process generation: prefill the prompt in one step, then decode token by token from the
//! KV cache (a step never recomputes the prompt). The cluster's scheduler batches many of these;
//! this engine serves `tessera generate` and the correctness tests.

use tessera_common::ModelSpec;
use tessera_kernels::{Backend, SeqMeta, StepMeta};

use crate::WorkerError;
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams, log_softmax, top_logprobs};

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

pub struct Engine<B: Backend> {
    model: Model<B>,
    cache: KvCache<B>,
}

impl<B: Backend> Engine<B> {
    pub fn new(model: Model<B>, config: EngineConfig) -> Result<Self, WorkerError> {
        let cache = KvCache::new(
            model.backend(),
            model.kv_specs(config.num_blocks, config.block_size),
        )?;
        Ok(Engine { model, cache })
    }

    pub fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }

    /// Generates for one request, calling `on_token` with each new token as it is chosen.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput, WorkerError> {
        req.validate(self.model.spec())?;
        let blocks = self
            .cache
            .allocate(self.cache.blocks_for(req.prompt.len() + req.max_tokens))?;
        let result = self.run(req, &blocks, &mut on_token);
        self.cache.release(blocks);
        result
    }

    fn run(
        &mut self,
        req: &GenerateRequest,
        blocks: &[u32],
        on_token: &mut dyn FnMut(u32),
    ) -> Result<GenerateOutput, WorkerError> {
        let vocab = self.model.spec().vocab_size;
        let n = req.prompt.len();
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut out = GenerateOutput {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            finish_reason: FinishReason::Length,
        };
        let rows: Vec<usize> = if req.prompt_logprobs {
            (0..n).collect()
        } else {
            vec![n - 1]
        };
        let mut logits = self.step(&req.prompt, n, blocks, &rows)?;
        if req.prompt_logprobs {
            out.prompt_logprobs.push(None);
            for i in 1..n {
                let lp = log_softmax(&logits[(i - 1) * vocab..i * vocab]);
                out.prompt_logprobs.push(Some(lp[req.prompt[i] as usize]));
            }
            logits.drain(..(n - 1) * vocab);
        }
        loop {
            let token = sampler.sample(&logits);
            let lp = log_softmax(&logits);
            out.logprobs.push(lp[token as usize]);
            if req.top_logprobs > 0 {
                out.top_logprobs.push(top_logprobs(&lp, req.top_logprobs));
            }
            out.token_ids.push(token);
            on_token(token);
            if req.stop_token_ids.contains(&token) {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            if out.token_ids.len() >= req.max_tokens {
                break;
            }
            logits = self.step(&[token], n + out.token_ids.len(), blocks, &[0])?;
        }
        Ok(out)
    }

    /// One step of a single sequence whose context (after this step) is `context_len` tokens.
    fn step(
        &mut self,
        tokens: &[u32],
        context_len: usize,
        blocks: &[u32],
        rows: &[usize],
    ) -> Result<Vec<f32>, WorkerError> {
        let meta = StepMeta {
            seqs: vec![SeqMeta {
                token_start: 0,
                num_tokens: tokens.len(),
                context_len,
                block_table: blocks.to_vec(),
            }],
            block_size: self.cache.block_size(),
        };
        Ok(self
            .model
            .forward(tokens, &meta, &mut self.cache, rows)?
            .logits)
    }
}

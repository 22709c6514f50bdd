//! Validated request types and the serving errors every API maps to its own status codes.
//!
//! Front ends (gRPC, HTTP, batch jobs) parse their own wire formats into [`RawRequest`], and
//! [`ModelInfo::validate`] turns that into [`GenerateParams`] or an error naming the field; nothing
//! invalid ever reaches the scheduler or a worker.

use std::sync::Arc;

use tessera_common::GenerationConfig;
use tessera_worker::sampling::SamplingParams;

use crate::scheduler::Priority;
use crate::tokenizer::Tokenizer;

/// Most alternatives a client may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The request is wrong; `field` names the offending part.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    QueueFull(String),
    /// The worker group is not whole (starting, or recovering from a lost worker).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ServeError::InvalidArgument {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The metrics' name for this error.
    pub fn kind(&self) -> crate::metrics::ErrorKind {
        use crate::metrics::ErrorKind;
        match self {
            ServeError::InvalidArgument { .. } | ServeError::NotFound(_) => {
                ErrorKind::InvalidRequest
            }
            ServeError::QueueFull(_) => ErrorKind::QueueFull,
            ServeError::Unavailable(_) => ErrorKind::Unavailable,
            ServeError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// The prompt as a client may give it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A request before validation; `None` means "the server's default".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawRequest {
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub logit_bias: Vec<(i64, f32)>,
    pub stop_token_ids: Vec<i64>,
    pub stop: Vec<String>,
    pub top_logprobs: Option<i64>,
    pub prompt_logprobs: bool,
    pub ignore_eos: bool,
    /// Whether a text prompt gets the tokenizer's special tokens (BOS); chat prompts already
    /// carry them from the template.
    pub add_special_tokens: bool,
}

/// A request ready for the scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Includes the model's eos ids unless the client asked to ignore them.
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub top_logprobs: usize,
    pub prompt_logprobs: bool,
    pub priority: Priority,
}

/// What the serving layer knows about the model it serves.
pub struct ModelInfo {
    /// The name clients use (`model` in OpenAI requests).
    pub name: String,
    pub architecture: String,
    pub vocab_size: usize,
    pub max_context: usize,
    pub eos_token_ids: Vec<u32>,
    pub generation: GenerationConfig,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// `tokenizer_config.json`'s chat template and special tokens, when present.
    pub chat: Option<crate::serving::chat::ChatTemplate>,
    pub world_size: usize,
    pub backend: String,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub placement_json: String,
}

fn token_id(field: &str, raw: i64, vocab: usize) -> Result<u32, ServeError> {
    if raw < 0 || raw as u64 >= vocab as u64 {
        return Err(ServeError::invalid(
            field,
            format!("token id {raw} is outside the vocabulary (0..{vocab})"),
        ));
    }
    Ok(raw as u32)
}

impl ModelInfo {
    /// Checks and completes `raw`; every error names the field.
    pub fn validate(
        &self,
        raw: RawRequest,
        priority: Priority,
    ) -> Result<GenerateParams, ServeError> {
        let vocab = self.vocab_size;
        let prompt = match raw.prompt {
            None => return Err(ServeError::invalid("prompt", "is required")),
            Some(Prompt::Ids(ids)) => ids,
            Some(Prompt::Text(text)) => {
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    ServeError::invalid(
                        "prompt",
                        "this model has no tokenizer.json; send token ids instead of text",
                    )
                })?;
                tok.encode(&text, raw.add_special_tokens)
                    .map_err(|e| ServeError::invalid("prompt", e.to_string()))?
            }
        };
        if prompt.is_empty() {
            return Err(ServeError::invalid("prompt", "is empty"));
        }
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= vocab) {
            return Err(ServeError::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary (0..{vocab})"),
            ));
        }
        if prompt.len() >= self.max_context {
            return Err(ServeError::invalid(
                "prompt",
                format!(
                    "{} tokens leave no room to generate in the model's context of {}",
                    prompt.len(),
                    self.max_context
                ),
            ));
        }
        let room = self.max_context - prompt.len();
        let max_tokens = match raw.max_tokens {
            None => room,
            Some(0) => return Err(ServeError::invalid("max_tokens", "must be at least 1")),
            Some(n) if n as usize > room => {
                return Err(ServeError::invalid(
                    "max_tokens",
                    format!(
                        "{n} + prompt ({}) exceeds the model's context of {}",
                        prompt.len(),
                        self.max_context
                    ),
                ));
            }
            Some(n) => n as usize,
        };
        let g = &self.generation;
        let top_k = match raw.top_k {
            // vLLM spells "off" as -1.
            Some(-1) | Some(0) => 0,
            Some(k) if k < 0 => {
                return Err(ServeError::invalid(
                    "top_k",
                    format!("must be >= 0 (or -1 for off), got {k}"),
                ));
            }
            Some(k) => k as usize,
            None => g.top_k.unwrap_or(0) as usize,
        };
        let mut logit_bias = Vec::with_capacity(raw.logit_bias.len());
        for (id, b) in raw.logit_bias {
            logit_bias.push((token_id("logit_bias", id, vocab)?, b));
        }
        let sampling = SamplingParams {
            temperature: raw.temperature.or(g.temperature).unwrap_or(1.0),
            top_p: raw.top_p.or(g.top_p).unwrap_or(1.0),
            top_k,
            min_p: raw.min_p.unwrap_or(0.0),
            presence_penalty: raw.presence_penalty.unwrap_or(0.0),
            frequency_penalty: raw.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: raw.repetition_penalty.unwrap_or(1.0),
            logit_bias,
            // Every rank must draw the same stream, so the seed is fixed here.
            seed: Some(raw.seed.unwrap_or_else(rand_seed)),
        };
        sampling.validate().map_err(|m| {
            let field = m
                .split_whitespace()
                .next()
                .unwrap_or("sampling")
                .to_string();
            ServeError::InvalidArgument { field, message: m }
        })?;
        let mut stop_token_ids = Vec::new();
        for id in raw.stop_token_ids {
            stop_token_ids.push(token_id("stop_token_ids", id, vocab)?);
        }
        if !raw.ignore_eos {
            for id in &self.eos_token_ids {
                if !stop_token_ids.contains(id) {
                    stop_token_ids.push(*id);
                }
            }
        }
        if raw.stop.len() > MAX_STOP_STRINGS {
            return Err(ServeError::invalid(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    raw.stop.len()
                ),
            ));
        }
        if raw.stop.iter().any(String::is_empty) {
            return Err(ServeError::invalid(
                "stop",
                "stop strings must not be empty",
            ));
        }
        if !raw.stop.is_empty() && self.tokenizer.is_none() {
            return Err(ServeError::invalid(
                "stop",
                "needs a model with tokenizer.json",
            ));
        }
        let top_logprobs = match raw.top_logprobs.unwrap_or(0) {
            n if !(0..=MAX_TOP_LOGPROBS as i64).contains(&n) => {
                return Err(ServeError::invalid(
                    "top_logprobs",
                    format!("must be in [0, {MAX_TOP_LOGPROBS}], got {n}"),
                ));
            }
            n => n as usize,
        };
        Ok(GenerateParams {
            prompt,
            max_tokens,
            sampling,
            stop_token_ids,
            stop_strings: raw.stop,
            top_logprobs,
            prompt_logprobs: raw.prompt_logprobs,
            priority,
        })
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A per-process random key mixed with a counter: unique seeds without a new dependency.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

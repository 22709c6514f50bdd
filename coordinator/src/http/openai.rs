//! OpenAI request bodies (with vLLM's common extensions: `top_k`, `min_p`,
//! `repetition_penalty`, `stop_token_ids`, `ignore_eos`) and their conversion into a
//! [`RawRequest`]. Unknown fields are ignored, as OpenAI's clients send many.

use std::collections::HashMap;

use serde::Deserialize;

use crate::serving::chat::Message;
use crate::serving::{Prompt, RawRequest, ServeError};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<i64>),
    Texts(Vec<String>),
    Batches(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Number of alternatives per token (the legacy completions API's integer).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    /// Parsed separately from the same body.
    #[serde(skip)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    /// Parsed separately from the same body.
    #[serde(skip)]
    pub sampling: Sampling,
}

impl Sampling {
    /// Fills the sampling part of `raw`, refusing what is not supported.
    fn apply(self, raw: &mut RawRequest) -> Result<(), ServeError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ServeError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
        raw.temperature = self.temperature;
        raw.top_p = self.top_p;
        raw.top_k = self.top_k;
        raw.min_p = self.min_p;
        raw.presence_penalty = self.presence_penalty;
        raw.frequency_penalty = self.frequency_penalty;
        raw.repetition_penalty = self.repetition_penalty;
        raw.seed = self.seed;
        for (key, bias) in self.logit_bias.unwrap_or_default() {
            let id = key.parse::<i64>().map_err(|_| {
                ServeError::invalid("logit_bias", format!("key {key:?} is not a token id"))
            })?;
            raw.logit_bias.push((id, bias));
        }
        raw.stop = match self.stop {
            None => vec![],
            Some(StopInput::One(s)) => vec![s],
            Some(StopInput::Many(v)) => v,
        };
        raw.stop_token_ids = self.stop_token_ids.unwrap_or_default();
        raw.ignore_eos = self.ignore_eos;
        Ok(())
    }
}

impl CompletionRequest {
    pub fn into_raw(self) -> Result<RawRequest, ServeError> {
        if self.echo {
            return Err(ServeError::invalid("echo", "echo is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ServeError::invalid(
                "best_of",
                "only best_of = 1 is supported",
            ));
        }
        if self.suffix.is_some() {
            return Err(ServeError::invalid("suffix", "suffix is not supported"));
        }
        let prompt = match self.prompt {
            PromptInput::Text(t) => Prompt::Text(t),
            PromptInput::Ids(ids) => Prompt::Ids(ids_of(ids)?),
            PromptInput::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
            PromptInput::Batches(mut v) if v.len() == 1 => Prompt::Ids(ids_of(v.remove(0))?),
            _ => {
                return Err(ServeError::invalid(
                    "prompt",
                    "one prompt per request (send a batch as a batch job)",
                ));
            }
        };
        let mut raw = RawRequest {
            prompt: Some(prompt),
            max_tokens: Some(self.max_tokens.unwrap_or(16)),
            top_logprobs: self.logprobs,
            add_special_tokens: true,
            ..Default::default()
        };
        self.sampling.apply(&mut raw)?;
        Ok(raw)
    }
}

fn ids_of(ids: Vec<i64>) -> Result<Vec<u32>, ServeError> {
    ids.into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| {
                ServeError::invalid("prompt", format!("token id {id} is negative or too large"))
            })
        })
        .collect()
}

impl ChatRequest {
    /// The messages as the chat template sees them.
    pub fn messages(&self) -> Result<Vec<Message>, ServeError> {
        if self.messages.is_empty() {
            return Err(ServeError::invalid("messages", "must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ServeError::invalid(
                                        &format!("messages[{i}].content"),
                                        format!("content parts of type {kind:?} are not supported"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }

    /// The request with `prompt` (the rendered template) as its text.
    pub fn into_raw(self, prompt: String) -> Result<RawRequest, ServeError> {
        let top = match (self.logprobs, self.top_logprobs) {
            (false, Some(n)) if n > 0 => {
                return Err(ServeError::invalid("top_logprobs", "needs logprobs: true"));
            }
            (true, n) => Some(n.unwrap_or(0)),
            (false, _) => None,
        };
        let mut raw = RawRequest {
            prompt: Some(Prompt::Text(prompt)),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            top_logprobs: top,
            // The template already wrote the special tokens.
            add_special_tokens: false,
            ..Default::default()
        };
        self.sampling.apply(&mut raw)?;
        Ok(raw)
    }
}

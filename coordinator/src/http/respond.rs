//! Running a completion or chat request and shaping the answer: one JSON body, or SSE chunks
//! (`data: {...}` per token, an optional usage chunk, then `data: [DONE]`). A request that fails
//! mid-stream (e.g. a worker died) gets a `data: {"error": ...}` chunk before `[DONE]`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};

use super::ApiError;
use super::openai::{ChatRequest, CompletionRequest};
use crate::scheduler::Priority;
use crate::serving::{EngineHandle, Event, RawRequest, RequestStream, ServeError, Usage};

/// A generated token, its log-probability and the alternatives asked for.
type SampledToken = (u32, f32, Vec<(u32, f32)>);

/// Which endpoint is answering: the shapes differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// What the response needs besides the events.
struct Shape {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check_model(engine: &EngineHandle, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != engine.info().name => {
            Err(ApiError::from(ServeError::NotFound(format!(
                "model {m:?} does not exist; this server serves {:?}",
                engine.info().name
            ))))
        }
        _ => Ok(()),
    }
}

pub async fn completion(engine: EngineHandle, req: CompletionRequest) -> Response {
    let shape = Shape {
        kind: Kind::Completion,
        id: String::new(),
        model: engine.info().name.clone(),
        created: now(),
        logprobs: req.logprobs.is_some(),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    let stream = req.stream;
    let run = async {
        check_model(&engine, req.model.as_deref())?;
        let raw = req.into_raw()?;
        start(&engine, raw).await
    };
    let started = run.await;
    finish(engine, shape, stream, started).await
}

pub async fn chat(engine: EngineHandle, req: ChatRequest) -> Response {
    let shape = Shape {
        kind: Kind::Chat,
        id: String::new(),
        model: engine.info().name.clone(),
        created: now(),
        logprobs: req.logprobs,
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    let stream = req.stream;
    let run = async {
        check_model(&engine, req.model.as_deref())?;
        let messages = req.messages()?;
        let template = engine.info().chat.as_ref().ok_or_else(|| {
            ServeError::invalid(
                "messages",
                "this model ships no chat template; use /v1/completions",
            )
        })?;
        let prompt = template.render(&messages)?;
        let raw = req.into_raw(prompt)?;
        start(&engine, raw).await
    };
    let started = run.await;
    finish(engine, shape, stream, started).await
}

async fn start(engine: &EngineHandle, raw: RawRequest) -> Result<RequestStream, ApiError> {
    let params = engine.info().validate(raw, Priority::Interactive)?;
    Ok(engine.submit(None, params).await?)
}

async fn finish(
    engine: EngineHandle,
    mut shape: Shape,
    stream: bool,
    started: Result<RequestStream, ApiError>,
) -> Response {
    let rs = match started {
        Ok(rs) => rs,
        Err(e) => return e.count(&engine),
    };
    shape.id = match shape.kind {
        Kind::Completion => format!("cmpl-{}", rs.request_id),
        Kind::Chat => format!("chatcmpl-{}", rs.request_id),
    };
    if stream {
        Sse::new(sse_stream(engine, shape, rs)).into_response()
    } else {
        collect(engine, shape, rs).await
    }
}

/// A token's text for logprobs (`token_id:N` without a tokenizer, as vLLM writes it).
fn token_text(engine: &EngineHandle, id: u32) -> String {
    engine
        .info()
        .tokenizer
        .as_ref()
        .and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("token_id:{id}"))
}

/// Log-probabilities of some tokens in the endpoint's shape.
fn logprobs_json(
    engine: &EngineHandle,
    kind: Kind,
    tokens: &[SampledToken],
    text_offset: usize,
) -> Value {
    match kind {
        Kind::Completion => {
            let mut offset = text_offset;
            let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
            for (id, lp, top) in tokens {
                let t = token_text(engine, *id);
                offsets.push(offset);
                offset += t.len();
                toks.push(t);
                lps.push(*lp);
                let map: serde_json::Map<String, Value> = top
                    .iter()
                    .map(|(i, l)| (token_text(engine, *i), json!(l)))
                    .collect();
                tops.push(Value::Object(map));
            }
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        }
        Kind::Chat => {
            let entry = |id: u32, lp: f32| {
                let t = token_text(engine, id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|(id, lp, top)| {
                    let mut e = entry(*id, *lp);
                    e["top_logprobs"] = top.iter().map(|(i, l)| entry(*i, *l)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn error_json(e: ServeError) -> Value {
    ApiError::from(e).body()
}

async fn collect(engine: EngineHandle, shape: Shape, mut rs: RequestStream) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rs.recv().await {
        match ev {
            Event::Token(t) => {
                text.push_str(&t.text);
                tokens.push((t.token, t.logprob, t.top_logprobs));
            }
            Event::Failed(e) => return ApiError::from(e).into_response(),
            Event::Finished {
                reason,
                text: rest,
                usage,
            } => {
                text.push_str(&rest);
                let logprobs = shape
                    .logprobs
                    .then(|| logprobs_json(&engine, shape.kind, &tokens, 0));
                let (object, choice) = match shape.kind {
                    Kind::Completion => (
                        "text_completion",
                        json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason.as_str()}),
                    ),
                    Kind::Chat => (
                        "chat.completion",
                        json!({
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs,
                            "finish_reason": reason.as_str(),
                        }),
                    ),
                };
                return axum::Json(json!({
                    "id": shape.id,
                    "object": object,
                    "created": shape.created,
                    "model": shape.model,
                    "choices": [choice],
                    "usage": usage_json(usage),
                }))
                .into_response();
            }
        }
    }
    ApiError::from(ServeError::Internal(
        "the request ended without an answer".into(),
    ))
    .into_response()
}

/// State of an SSE response between events.
struct Streamer {
    engine: EngineHandle,
    shape: Shape,
    rs: RequestStream,
    /// Bytes of text sent so far (completion logprobs' text offsets).
    offset: usize,
    first: bool,
    /// Chunks ready to go out, oldest first.
    pending: Vec<Value>,
    done: bool,
}

impl Streamer {
    fn chunk(&self, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        let choice = match self.shape.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Chat => {
                let mut delta = json!({});
                if self.first {
                    delta["role"] = json!("assistant");
                }
                if !text.is_empty() || finish.is_none() {
                    delta["content"] = json!(text);
                }
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.envelope(json!([choice]))
    }

    fn envelope(&self, choices: Value) -> Value {
        let object = match self.shape.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({
            "id": self.shape.id,
            "object": object,
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": choices,
        })
    }

    /// Turns the next engine event into chunks; false once the stream is over.
    async fn advance(&mut self) -> bool {
        let Some(ev) = self.rs.recv().await else {
            return false;
        };
        match ev {
            Event::Token(t) => {
                let lp = self.shape.logprobs.then(|| {
                    logprobs_json(
                        &self.engine,
                        self.shape.kind,
                        &[(t.token, t.logprob, t.top_logprobs)],
                        self.offset,
                    )
                });
                self.offset += t.text.len();
                let c = self.chunk(&t.text, lp, None);
                self.first = false;
                self.pending.push(c);
            }
            Event::Finished {
                reason,
                text,
                usage,
            } => {
                let c = self.chunk(&text, None, Some(reason.as_str()));
                self.pending.push(c);
                if self.shape.include_usage {
                    let mut u = self.envelope(json!([]));
                    u["usage"] = usage_json(usage);
                    self.pending.push(u);
                }
                self.done = true;
            }
            Event::Failed(e) => {
                self.pending.push(error_json(e));
                self.done = true;
            }
        }
        true
    }
}

fn sse_stream(
    engine: EngineHandle,
    shape: Shape,
    rs: RequestStream,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let streamer = Streamer {
        engine,
        shape,
        rs,
        offset: 0,
        first: true,
        pending: Vec::new(),
        done: false,
    };
    stream::unfold(Some(streamer), |state| async move {
        let mut s = state?;
        loop {
            if !s.pending.is_empty() {
                let chunk = s.pending.remove(0);
                return Some((Ok(SseEvent::default().data(chunk.to_string())), Some(s)));
            }
            if s.done || !s.advance().await {
                // `[DONE]` ends every stream, even one that failed.
                return Some((Ok(SseEvent::default().data("[DONE]")), None));
            }
        }
    })
}

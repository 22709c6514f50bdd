//! The OpenAI-compatible HTTP API (axum): `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (JSON or SSE streaming ending in `data: [DONE]`), `/v1/placement`
//! and `/health`. Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! Bodies are parsed by hand (not axum's `Json` extractor) so that every malformed body gets an
//! OpenAI-shaped 400 naming the field at fault.

mod openai;
mod respond;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::auth::{ApiKeyAuth, require_key};
use crate::metrics::ErrorKind;
use crate::serving::{EngineHandle, ServeError};

pub use openai::{ChatRequest, CompletionRequest};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// An error as an HTTP response.
pub struct ApiError {
    status: StatusCode,
    /// For the error counter.
    error_kind: ErrorKind,
    kind: &'static str,
    code: &'static str,
    param: Option<String>,
    message: String,
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let (status, kind, code, param) = match &e {
            ServeError::InvalidArgument { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                Some(field.clone()),
            ),
            ServeError::QueueFull(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                None,
            ),
            ServeError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "unavailable",
                None,
            ),
            ServeError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                None,
            ),
            ServeError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal",
                None,
            ),
        };
        ApiError {
            status,
            error_kind: e.kind(),
            kind,
            code,
            param,
            message: e.to_string(),
        }
    }
}

impl ApiError {
    fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl ApiError {
    /// The response, after counting the error.
    fn count(self, engine: &EngineHandle) -> Response {
        engine.metrics().error(self.error_kind);
        self.into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a JSON body as `T`; errors name the path of the field at fault. Request types that
/// share fields parse the same value twice (serde's `flatten` would lose the path).
fn parse<T: DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ServeError::invalid(&field, format!("malformed request: {}", e.inner())).into()
    })
}

/// The body, or an OpenAI-shaped error naming it (413 when over [`MAX_BODY_BYTES`]).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        ApiError {
            status,
            error_kind: ErrorKind::InvalidRequest,
            kind: "invalid_request_error",
            code: if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request_too_large"
            } else {
                "invalid_body"
            },
            param: Some("body".into()),
            message: format!("{rejection} (the limit is {MAX_BODY_BYTES} bytes)"),
        }
    })
}

fn parse_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ServeError::invalid("body", format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ServeError::invalid("body", "must be a JSON object").into());
    }
    Ok(value)
}

/// A `POST /v1/completions` body as a request (also the request fuzz target's entry).
pub(crate) fn completion_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let v = parse_body(body)?;
    let mut req: CompletionRequest = parse(&v)?;
    req.sampling = parse(&v)?;
    Ok(req)
}

/// A `POST /v1/chat/completions` body as a request (also the request fuzz target's entry).
pub(crate) fn chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v = parse_body(body)?;
    let mut req: ChatRequest = parse(&v)?;
    req.sampling = parse(&v)?;
    Ok(req)
}

/// The HTTP API; with `auth` enabled every route but the exempt ones needs the API key.
pub fn router(engine: EngineHandle, auth: ApiKeyAuth) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/placement", get(placement).put(set_placement))
        .route("/metrics", get(metrics))
        .route("/v1/metrics/targets", get(metrics_targets))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(auth, require_key))
        .with_state(engine)
}

async fn health(State(engine): State<EngineHandle>) -> Response {
    let stats = engine.stats();
    match engine.health() {
        Ok(()) => axum::Json(json!({
            "status": "ok",
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_cache_usage": stats.used_blocks as f64 / stats.num_blocks.max(1) as f64,
            "group_failures": engine.group_failures(),
        }))
        .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "status": "degraded",
                "reason": reason,
                "group_failures": engine.group_failures(),
            })),
        )
            .into_response(),
    }
}

/// Prometheus' text exposition of the coordinator's metrics.
async fn metrics(State(engine): State<EngineHandle>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        engine.metrics().render(),
    )
        .into_response()
}

/// Scrape targets in Prometheus' HTTP service-discovery format (`http_sd_configs`): this
/// coordinator and every rank of the current group, so one Prometheus job finds them all.
async fn metrics_targets(
    State(engine): State<EngineHandle>,
    headers: axum::http::HeaderMap,
) -> Response {
    let mut groups = Vec::new();
    if let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        groups.push(json!({"targets": [host], "labels": {"tessera_role": "coordinator"}}));
    }
    // No `model`/`rank` target labels: the series carry their own, and a target label of the
    // same name would rename them (`exported_rank`).
    for addr in engine.metrics_addresses() {
        groups.push(json!({"targets": [addr], "labels": {"tessera_role": "worker"}}));
    }
    axum::Json(groups).into_response()
}

async fn models(State(engine): State<EngineHandle>) -> Response {
    let info = engine.info();
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "tessera",
            "max_model_len": info.max_context,
            "vocab_size": info.vocab_size,
        }],
    }))
    .into_response()
}

async fn placement(State(engine): State<EngineHandle>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        engine.placement_json(),
    )
        .into_response()
}

/// `PUT /v1/placement` with a placement map (the shape `GET` returns).
async fn set_placement(
    State(engine): State<EngineHandle>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let map: tessera_common::PlacementMap = parse(&parse_body(&body_bytes(body)?)?)?;
        engine.set_placement(map).await?;
        Ok::<_, ApiError>(())
    };
    match result.await {
        Ok(()) => placement(State(engine)).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(engine): State<EngineHandle>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body_bytes(body).and_then(|b| completion_request(&b)) {
        Ok(req) => respond::completion(engine, req).await,
        Err(e) => e.count(&engine),
    }
}

async fn chat_completions(
    State(engine): State<EngineHandle>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body_bytes(body).and_then(|b| chat_request(&b)) {
        Ok(req) => respond::chat(engine, req).await,
        Err(e) => e.count(&engine),
    }
}

//! Optional API-key authentication of the public listeners: when a key is configured, every HTTP
//! route and gRPC method asks for `Authorization: Bearer KEY` (OpenAI clients send it from their
//! `api_key`), except the routes and gRPC services named as exempt (by default `/health`,
//! `/metrics` and `grpc.health.v1.Health`, so load balancers and Prometheus need no secret).
//!
//! Keys are compared in constant time (`subtle`), so response timing reveals nothing about how
//! much of a guess was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// Routes and services reachable without the key unless configured otherwise.
pub const DEFAULT_EXEMPT: &[&str] = &["/health", "/metrics", "grpc.health.v1.Health"];

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("--api-key is empty; leave it unset to turn authentication off")]
    EmptyKey,
}

#[derive(Clone, Debug, Default)]
pub struct ApiKeyAuth {
    key: Option<Arc<[u8]>>,
    exempt: Arc<[String]>,
}

impl ApiKeyAuth {
    /// No authentication.
    pub fn off() -> Self {
        Self::default()
    }

    /// Requires `key` everywhere except `exempt` (HTTP paths like `/health`, gRPC service names
    /// like `grpc.health.v1.Health`).
    pub fn new(key: Option<String>, exempt: Vec<String>) -> Result<Self, AuthError> {
        let key = match key {
            Some(k) if k.is_empty() => return Err(AuthError::EmptyKey),
            k => k.map(|k| Arc::from(k.into_bytes())),
        };
        Ok(ApiKeyAuth {
            key,
            exempt: exempt.into(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Whether an HTTP path or gRPC service is reachable without the key.
    pub fn is_exempt(&self, name: &str) -> bool {
        self.exempt.iter().any(|e| e == name)
    }

    /// Whether an `Authorization` header value carries the key (always true when auth is off).
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(key) = &self.key else {
            return true;
        };
        let Some(token) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        token.ct_eq(key).into()
    }

    /// A gRPC interceptor enforcing the key.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>
    {
        let auth = self.clone();
        move |req: tonic::Request<()>| {
            let header = req.metadata().get("authorization").map(|v| v.as_bytes());
            if auth.accepts(header) {
                Ok(req)
            } else {
                Err(tonic::Status::unauthenticated(
                    "missing or wrong API key: send `authorization: Bearer <key>`",
                ))
            }
        }
    }
}

/// axum middleware: a 401 in OpenAI's error shape unless the key is present or the path exempt.
pub async fn require_key(State(auth): State<ApiKeyAuth>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if auth.is_exempt(req.uri().path()) || auth.accepts(header) {
        return next.run(req).await;
    }
    let body = serde_json::json!({"error": {
        "message": "missing or wrong API key: send `Authorization: Bearer <key>`",
        "type": "authentication_error",
        "param": null,
        "code": "invalid_api_key",
    }});
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked_exactly() {
        let auth = ApiKeyAuth::new(Some("s3cret".into()), vec!["/health".into()]).unwrap();
        assert!(auth.accepts(Some(b"Bearer s3cret")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret ",
            b"s3cret",
            b"bearer s3cret",
            b"",
        ] {
            assert!(
                !auth.accepts(Some(bad)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(!auth.accepts(None));
        assert!(auth.is_exempt("/health") && !auth.is_exempt("/v1/models"));
        assert!(ApiKeyAuth::off().accepts(None));
        assert!(matches!(
            ApiKeyAuth::new(Some(String::new()), vec![]),
            Err(AuthError::EmptyKey)
        ));
    }
}

//! Serving: everything between a user's request and the worker group.
//!
//! - [`request`]: validated request types and serving errors.
//! - [`engine`]: the loop that owns the scheduler and the workers, behind an [`EngineHandle`].
//! - [`output`]: streaming detokenisation and stop strings.
//! - [`chat`]: chat templates.

pub mod chat;
pub mod engine;
pub mod output;
pub mod request;

pub use engine::{EngineHandle, Event, FinishReason, RequestStream, RunnerFactory, Usage};
pub use request::{GenerateParams, ModelInfo, Prompt, RawRequest, ServeError};

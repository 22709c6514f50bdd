//! Errors raised by backends. Each names the operation and the shapes or values that were wrong.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    /// The CUDA backend was asked for but cannot run here: the crate was built without the `cuda`
    /// feature, or no driver / device is present.
    #[error("CUDA not available: {0}")]
    CudaNotAvailable(String),
    /// Operands whose shapes do not fit together.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    /// A value outside what the operation accepts (an expert id, a block index, a position).
    #[error("{op}: invalid argument: {detail}")]
    Invalid { op: &'static str, detail: String },
}

impl BackendError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        BackendError::Shape {
            op,
            detail: detail.into(),
        }
    }
    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        BackendError::Invalid {
            op,
            detail: detail.into(),
        }
    }
}

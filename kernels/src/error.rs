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
    /// The device, its driver or one of its libraries failed (an allocation, a launch, a copy, a
    /// kernel compilation), with what the library said.
    #[error("{op}: device error: {detail}")]
    Device { op: &'static str, detail: String },
    /// An operation this backend does not implement yet.
    #[error("{op}: not supported by the {backend} backend yet")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
    },
}

impl BackendError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        BackendError::Shape {
            op,
            detail: detail.into(),
        }
    }
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn device(op: &'static str, detail: impl std::fmt::Debug) -> Self {
        BackendError::Device {
            op,
            detail: format!("{detail:?}"),
        }
    }
    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        BackendError::Invalid {
            op,
            detail: detail.into(),
        }
    }
}

//! The CUDA backend's entry point.
//!
//! Kernel sources live in `kernels/cuda/*.cu` and are compiled by NVRTC at worker warm-up; the
//! backend itself arrives with the GPU issue. Until then, and always in builds without the `cuda`
//! feature, asking for it yields [`BackendError::CudaNotAvailable`] so that device selection can
//! fall back to the CPU or report a clear error.

use crate::{BackendError, Result};

/// Handle to a CUDA device (not constructible until the CUDA backend lands).
#[derive(Debug)]
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Opens device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        if cfg!(feature = "cuda") {
            Err(BackendError::CudaNotAvailable(format!(
                "device {ordinal}: this build has the `cuda` feature, but the CUDA backend is not implemented yet"
            )))
        } else {
            Err(BackendError::CudaNotAvailable(format!(
                "device {ordinal}: this binary was built without the `cuda` feature"
            )))
        }
    }
}

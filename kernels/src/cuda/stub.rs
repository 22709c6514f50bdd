//! The CUDA backend in a build without the `cuda` feature: a handle that cannot be made.

use crate::{BackendError, Result};

/// Handle to a CUDA device; this build has no CUDA support, so [`CudaBackend::new`] always fails.
#[derive(Debug)]
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Opens device `ordinal`: always [`BackendError::CudaNotAvailable`] in this build.
    pub fn new(ordinal: usize) -> Result<Self> {
        Err(BackendError::CudaNotAvailable(format!(
            "device {ordinal}: this binary was built without the `cuda` feature"
        )))
    }
}

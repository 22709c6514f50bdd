//! What the device's allocators hold for this process, for sizing the KV cache from a measured
//! step rather than a guess.
//!
//! Every allocation of the backend (weights, KV cache, activations) comes from the device's
//! default memory pool (cudarc allocates in stream order when the device has pools, as every GPU
//! since Pascal does), and everything allocated inside a graph capture from the driver's graph
//! memory. Both keep freed memory for later allocations, so their *reserved* bytes, not what
//! live allocations use, are what a step takes from the device: the pool keeps everything up to
//! its high-water mark ([`keep_pool_memory`]), graph memory until it is trimmed. The driver
//! tracks the high-water mark of each ([`CudaBackend::memory_use_impl`]); a trim hands back what
//! no allocation uses and starts new marks ([`CudaBackend::trim_memory_impl`]).

use cudarc::driver::sys::{CUgraphMem_attribute, CUmemPool_attribute, CUmemoryPool};
use cudarc::driver::{CudaContext, result, sys};

use super::device::CudaBackend;
use crate::{BackendError, MemoryUse, Result};

/// Tells the device's default memory pool to keep freed memory. By default it returns it to the
/// OS at every synchronisation, and every decode step ends in one (the copy of its results), so
/// each step would map its activations afresh; a serving process wants the pool to stay at its
/// high-water mark.
pub(super) fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    let err = |e| BackendError::device("CudaBackend::new memory pool", e);
    // SAFETY: `cu_device()` is the context's device, from cuDeviceGet.
    let pool = unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }.map_err(err)?;
    set_pool(
        pool,
        CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )
    .map_err(err)
}

/// Sets a cuuint64_t attribute of `pool`.
fn set_pool(
    pool: CUmemoryPool,
    attr: CUmemPool_attribute,
    mut value: u64,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    // SAFETY: `pool` is the device's default pool (it lives as long as the context); the
    // attributes set here (release threshold, high-water marks) are cuuint64_t passed by pointer,
    // and `value` outlives the call.
    unsafe { result::mem_pool::set_attribute(pool, attr, (&mut value as *mut u64).cast()) }
}

impl CudaBackend {
    fn pool(&self, op: &'static str) -> Result<CUmemoryPool> {
        // SAFETY: `cu_device()` is the context's device, from cuDeviceGet.
        unsafe { result::device::get_default_mem_pool(self.ctx.cu_device()) }
            .map_err(|e| BackendError::device(op, e))
    }

    /// Waits for the queued work, hands unused pool and graph memory back to the driver, and
    /// restarts both high-water marks from what is held now.
    pub(super) fn trim_memory_impl(&self) -> Result<()> {
        const OP: &str = "trim_memory";
        if !self.ctx.has_async_alloc() {
            return Ok(());
        }
        self.synchronize()?;
        let err = |e| BackendError::device(OP, e);
        self.ctx.bind_to_thread().map_err(err)?;
        let pool = self.pool(OP)?;
        let dev = self.ctx.cu_device();
        // SAFETY: `pool` is the device's default pool; trimming releases only memory that no
        // allocation uses, and the queued work that might still free some has finished.
        unsafe { result::mem_pool::trim_to(pool, 0) }.map_err(err)?;
        // SAFETY: `dev` is the context's device, bound to this thread above.
        unsafe { sys::cuDeviceGraphMemTrim(dev) }
            .result()
            .map_err(err)?;
        set_pool(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            0,
        )
        .map_err(err)?;
        let mut zero = 0u64;
        // SAFETY: as above; the high-water mark is a cuuint64_t that may only be reset to 0,
        // passed by pointer to `zero`, which outlives the call.
        unsafe {
            sys::cuDeviceSetGraphMemAttribute(
                dev,
                CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .result()
        .map_err(err)
    }

    /// The bytes the pool and graph memory reserve now and at most since the last trim; `None`
    /// on a device without memory pools (its allocations are plain `cuMemAlloc`s).
    pub(super) fn memory_use_impl(&self) -> Result<Option<MemoryUse>> {
        const OP: &str = "memory_use";
        if !self.ctx.has_async_alloc() {
            return Ok(None);
        }
        let err = |e| BackendError::device(OP, e);
        self.ctx.bind_to_thread().map_err(err)?;
        let pool = self.pool(OP)?;
        let dev = self.ctx.cu_device();
        let pool_attr = |attr| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: `pool` is the device's default pool; the reserved-memory attributes are
            // cuuint64_t, written to `v`.
            unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
                .map_err(err)?;
            Ok(v)
        };
        let graph_attr = |attr| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: `dev` is the context's device, bound to this thread; the graph memory
            // attributes are cuuint64_t, written to `v`.
            unsafe { sys::cuDeviceGetGraphMemAttribute(dev, attr, (&mut v as *mut u64).cast()) }
                .result()
                .map_err(err)?;
            Ok(v)
        };
        use CUgraphMem_attribute::*;
        use CUmemPool_attribute::*;
        Ok(Some(MemoryUse {
            pool: pool_attr(CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            pool_peak: pool_attr(CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            graphs: graph_attr(CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT)?,
            graphs_peak: graph_attr(CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH)?,
        }))
    }
}

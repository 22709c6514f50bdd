//! CUDA graphs: device work captured once and replayed with one launch.
//!
//! A decode step is hundreds of small kernels, and at small batches the host's cost of
//! launching them one by one, not the GPU, bounds the step. A graph records the work a closure
//! queues on the backend's stream and replays all of it with one `cuGraphLaunch`. What a replay
//! sees is fixed at capture: kernel arguments (device addresses and scalars), launch shapes and
//! every allocation's address. So a replayed step reads its inputs from, and writes its outputs
//! to, tensors that live across launches: the caller fills them ([`CudaBackend::write_into`])
//! before each launch and copies the captured results into them inside the capture
//! ([`crate::Backend::copy_into`]). Tensors allocated inside the capture belong to the graph and
//! must be dropped inside it too.
//!
//! CUDA refuses, and invalidates the capture on, anything a graph cannot hold: copies to or from
//! the host and synchronisation. So an operation that needs the host (an upload of per-step
//! metadata, a host round-trip) fails the capture with an error, never a wrong replay.

use std::sync::Mutex;

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::device::{CudaBackend, CudaTensor};
use crate::{BackendError, Result};

/// Work captured by [`crate::Backend::capture`], replayed by [`crate::Backend::replay`].
pub struct DeviceGraph {
    /// The driver does not synchronise access to a graph: the lock does.
    graph: Mutex<Owned>,
}

/// A graph that may move between threads.
struct Owned(CudaGraph);

// SAFETY: the graph's handles are plain driver objects that any thread may use once the context
// is bound, which cudarc does before every launch and in drop; the driver forbids only
// concurrent use of one graph, which `DeviceGraph`'s mutex rules out.
unsafe impl Send for Owned {}

impl CudaBackend {
    /// Captures the device work `body` queues into a graph, or returns the first error: one of
    /// `body`'s own, or the driver's refusal of something a graph cannot hold. The stream is out
    /// of capture mode again either way.
    pub(super) fn capture_impl(&self, body: impl FnOnce() -> Result<()>) -> Result<DeviceGraph> {
        const OP: &str = "capture";
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| BackendError::device(OP, e))?;
        // Ends the capture if `body` panics, so the stream is not left capturing.
        let mut guard = EndCapture {
            backend: self,
            armed: true,
        };
        let ran = body();
        guard.armed = false;
        // A refused free inside the capture is recorded on the context, not returned; taken
        // first, since cudarc refuses every later call (ending the capture too) while it is set.
        let recorded = self.ctx.check_err();
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        ran?;
        recorded.map_err(|e| BackendError::device(OP, e))?;
        match ended.map_err(|e| BackendError::device(OP, e))? {
            Some(graph) => Ok(DeviceGraph {
                graph: Mutex::new(Owned(graph)),
            }),
            None => Err(BackendError::invalid(OP, "the capture recorded no work")),
        }
    }

    /// Runs a captured graph on this backend's stream (counted as one launch).
    pub(super) fn replay_impl(&self, g: &DeviceGraph) -> Result<()> {
        self.counted();
        let graph = g.graph.lock().unwrap_or_else(|p| p.into_inner());
        graph
            .0
            .launch()
            .map_err(|e| BackendError::device("replay", e))
    }

    /// Overwrites `dst` with `data` from the host (outside a capture: a graph's inputs).
    pub fn write_into(&self, dst: &mut CudaTensor, data: &[f32]) -> Result<()> {
        const OP: &str = "write_into";
        if data.len() != dst.rows * dst.cols {
            return Err(BackendError::shape(
                OP,
                format!("{} values for {}x{}", data.len(), dst.rows, dst.cols),
            ));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(data, &mut dst.data)
            .map_err(|e| BackendError::device(OP, e))
    }

    /// Copies `src` into the first rows of `dst` on the device (inside a capture: a graph's
    /// outputs).
    pub(super) fn copy_into_impl(&self, dst: &mut CudaTensor, src: &CudaTensor) -> Result<()> {
        const OP: &str = "copy_into";
        crate::backend::check_copy_into((dst.rows, dst.cols), (src.rows, src.cols))?;
        let n = src.rows * src.cols;
        if n == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(&src.data.slice(..n), &mut dst.data)
            .map_err(|e| BackendError::device(OP, e))
    }
}

impl CudaBackend {
    /// Copies all of `src` into `dst`'s elements from `offset` on, on the device.
    pub(super) fn pack_into_impl(
        &self,
        dst: &mut CudaTensor,
        offset: usize,
        src: &CudaTensor,
    ) -> Result<()> {
        const OP: &str = "pack_into";
        let n = src.rows * src.cols;
        crate::backend::check_pack_into(dst.rows * dst.cols, offset, n)?;
        if n == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(
                &src.data.slice(..n),
                &mut dst.data.slice_mut(offset..offset + n),
            )
            .map_err(|e| BackendError::device(OP, e))
    }

    /// Rows `start .. start + len` of `x`, copied on the device (one contiguous range).
    pub(super) fn narrow_rows_impl(
        &self,
        x: &CudaTensor,
        start: usize,
        len: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "narrow_rows";
        crate::backend::check_narrow_rows(x.rows, start, len)?;
        let mut out = self.output(OP, len, x.cols)?;
        let n = len * x.cols;
        if n == 0 {
            return Ok(out);
        }
        let from = start * x.cols;
        self.stream
            .memcpy_dtod(&x.data.slice(from..from + n), &mut out.data)
            .map_err(|e| BackendError::device(OP, e))?;
        Ok(out)
    }
}

/// Ends a capture that unwinding left open.
struct EndCapture<'a> {
    backend: &'a CudaBackend,
    armed: bool,
}

impl Drop for EndCapture<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.backend.ctx.check_err();
            // The graph of an abandoned capture is dropped at once.
            let _ = self.backend.stream.end_capture(CUgraphInstantiate_flags(0));
        }
    }
}

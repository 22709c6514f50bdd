//! What the GPU's memory can deliver, for benchmarks that state decode speed as a fraction of it:
//! the peak from the driver's memory clock and bus width (the data-sheet figure), and a measured
//! device-to-device copy (what a streaming kernel can actually reach).

use std::time::Instant;

use cudarc::driver::sys::CUdevice_attribute;

use super::device::CudaBackend;
use crate::{BackendError, Result};

impl CudaBackend {
    /// Peak memory bandwidth in GB/s (10⁹ bytes/s): `2 × memory clock × bus width` (double data
    /// rate), e.g. 3352 for an H100 SXM's HBM3. `None` when the driver does not report the two
    /// attributes.
    pub fn peak_bandwidth_gb_s(&self) -> Option<f64> {
        let clock_khz = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .ok()?;
        let bus_bits = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            .ok()?;
        (clock_khz > 0 && bus_bits > 0)
            .then(|| 2.0 * f64::from(clock_khz) * 1e3 * f64::from(bus_bits) / 8.0 / 1e9)
    }

    /// The best of `reps` device-to-device copies of `bytes`, in GB/s counting the bytes read and
    /// the bytes written (`2 × bytes / time`).
    pub fn copy_bandwidth_gb_s(&self, bytes: usize, reps: usize) -> Result<f64> {
        const OP: &str = "copy_bandwidth";
        let src = self.zeros::<u8>(OP, bytes)?;
        let mut dst = self.zeros::<u8>(OP, bytes)?;
        self.synchronize()?;
        let mut best = f64::INFINITY;
        // One untimed copy first: the first touch of fresh pages costs extra.
        for rep in 0..=reps.max(1) {
            let started = Instant::now();
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| BackendError::device(OP, e))?;
            self.synchronize()?;
            if rep > 0 {
                best = best.min(started.elapsed().as_secs_f64());
            }
        }
        Ok(2.0 * bytes as f64 / best / 1e9)
    }
}

//! The machine's two roofs: STREAM-like memory bandwidth (what batch-1 decode is bound by) and
//! peak multiply-add throughput (what large batches are bound by).
//!
//! Decode reads every active weight once per token, so its speed limit is how fast this machine
//! streams bytes from DRAM into the cores. The probes read (and copy) a buffer much larger than
//! the last-level cache on every thread of the pool at once, the way the kernels read weights: each
//! thread takes a contiguous part and reads it as one, four or eight sequential streams (the
//! kernels use three or four; with one, a core keeps fewer misses in flight). The best of several repetitions is reported,
//! so the roof is what the machine can do, not an average that includes interference.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

/// Bandwidths in 10⁹ bytes per second (best of the repetitions).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Bandwidth {
    /// Sum of a buffer, one sequential stream per thread.
    pub read_1stream_gb_s: f64,
    /// Sum of a buffer, four sequential streams per thread.
    pub read_4stream_gb_s: f64,
    /// Sum of a buffer, eight sequential streams per thread.
    pub read_8stream_gb_s: f64,
    /// `memcpy` of a buffer, counting bytes read plus bytes written (as STREAM's Copy does).
    pub copy_gb_s: f64,
    /// Bytes of the read buffer.
    pub bytes: usize,
    pub threads: usize,
}

impl Bandwidth {
    /// The read roof: the best of the read probes.
    pub fn read_gb_s(&self) -> f64 {
        self.read_1stream_gb_s
            .max(self.read_4stream_gb_s)
            .max(self.read_8stream_gb_s)
    }

    /// The better of two measurements, probe by probe.
    pub fn max(self, other: Bandwidth) -> Bandwidth {
        Bandwidth {
            read_1stream_gb_s: self.read_1stream_gb_s.max(other.read_1stream_gb_s),
            read_4stream_gb_s: self.read_4stream_gb_s.max(other.read_4stream_gb_s),
            read_8stream_gb_s: self.read_8stream_gb_s.max(other.read_8stream_gb_s),
            copy_gb_s: self.copy_gb_s.max(other.copy_gb_s),
            ..self
        }
    }
}

/// Sum of `v` read as `S` sequential streams in lockstep (its `S` equal parts), with eight partial
/// sums per stream: few enough registers that the loop is bound by loads, not by spills.
fn sum_streams<const S: usize>(v: &[f32]) -> f32 {
    let q = v.len() / S / 8 * 8;
    let mut acc = [[0f32; 8]; S];
    for c in (0..q).step_by(8) {
        for (s, a) in acc.iter_mut().enumerate() {
            let chunk = &v[s * q + c..s * q + c + 8];
            for j in 0..8 {
                a[j] += chunk[j];
            }
        }
    }
    acc.iter().flatten().sum::<f32>() + v[S * q..].iter().sum::<f32>()
}

/// Sums `data` on every thread of the pool at once, each thread reading its own contiguous part as
/// `streams` (1, 4 or 8) sequential streams: one pass of the read probe.
pub fn read_pass(data: &[f32], streams: usize) -> f32 {
    let threads = rayon::current_num_threads().max(1);
    let part = data.len().div_ceil(threads);
    let f: fn(&[f32]) -> f32 = match streams {
        1 => sum_streams::<1>,
        4 => sum_streams::<4>,
        _ => sum_streams::<8>,
    };
    rayon::broadcast(|ctx| {
        let start = (ctx.index() * part).min(data.len());
        f(&data[start..(start + part).min(data.len())])
    })
    .iter()
    .sum()
}

/// Best seconds of `reps` runs of `f`.
fn best_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Measures read and copy bandwidth over `bytes`-sized buffers (at least 1 MiB), best of `reps`.
/// Allocates `2 × bytes` for the duration of the call.
pub fn bandwidth(bytes: usize, reps: usize) -> Bandwidth {
    let len = (bytes.max(1 << 20) / 4).next_multiple_of(64);
    let threads = rayon::current_num_threads().max(1);
    let part = len.div_ceil(threads).next_multiple_of(64);
    // Distinct non-zero values: nothing a clever page-sharing hypervisor could deduplicate.
    let src: Vec<f32> = (0..len).map(|i| (i % 1021) as f32).collect();
    let mut dst = vec![0f32; len];
    let read = |streams| {
        best_secs(reps, || {
            black_box(read_pass(black_box(&src), streams));
        })
    };
    let (r1, r4, r8) = (read(1), read(4), read(8));
    let copy = best_secs(reps, || {
        dst.par_chunks_mut(part)
            .zip(src.par_chunks(part))
            .for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&dst);
    });
    let b = (len * 4) as f64;
    Bandwidth {
        read_1stream_gb_s: b / r1 / 1e9,
        read_4stream_gb_s: b / r4 / 1e9,
        read_8stream_gb_s: b / r8 / 1e9,
        copy_gb_s: 2.0 * b / copy / 1e9,
        bytes: len * 4,
        threads,
    }
}

/// Runs `iters` rounds of register-only multiply-adds (twelve independent vector chains) on every
/// thread of the pool and returns the FLOPs done (a multiply-add is two); `None` without SIMD
/// kernels. Timed by the caller, this is the compute roof: it measures the FMA units, not memory.
pub fn fma_burst(iters: usize) -> Option<f64> {
    let isa = super::linear::Isa::best();
    isa.fma_flops(1)?;
    Some(
        rayon::broadcast(|_| isa.fma_flops(iters).unwrap_or(0.0))
            .iter()
            .sum(),
    )
}

/// Peak f32 multiply-add throughput of all threads in 10⁹ FLOP/s ([`fma_burst`] of ~1 GFLOP per
/// thread, best of `reps`); `None` without SIMD kernels.
pub fn fma_peak_gflops(reps: usize) -> Option<f64> {
    const ITERS: usize = 5_000_000;
    fma_burst(1)?;
    let mut flops = 0.0;
    let secs = best_secs(reps, || flops = fma_burst(ITERS).unwrap_or(0.0));
    Some(flops / secs / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_match_and_probe_reports_positive_rates() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want: f32 = v.iter().sum();
        for got in [
            sum_streams::<1>(&v),
            sum_streams::<4>(&v),
            sum_streams::<8>(&v),
        ] {
            assert_eq!(got, want);
        }
        assert_eq!(read_pass(&v, 4), want);
        let b = bandwidth(1 << 20, 2);
        assert!(b.read_gb_s() > 0.0 && b.copy_gb_s > 0.0);
        assert_eq!(b.bytes, 1 << 20);
        let better = b.max(Bandwidth {
            read_1stream_gb_s: f64::INFINITY,
            ..b
        });
        assert_eq!(better.read_gb_s(), f64::INFINITY);
    }

    #[test]
    fn fma_peak_is_positive_where_there_are_simd_kernels() {
        match super::super::linear::Isa::best() {
            super::super::linear::Isa::Portable => assert!(fma_peak_gflops(1).is_none()),
            #[cfg(target_arch = "x86_64")]
            _ => assert!(fma_peak_gflops(1).unwrap() > 0.0),
        }
    }
}

//! Inputs the kernel benches share: deterministic pseudo-random values and bf16 weights made
//! from them, so every bench measures the same data run after run.

// Each bench is its own crate and uses only part of this module.
#![allow(dead_code)]

use tessera_kernels::cpu::{CpuBackend, CpuWeight};
use tessera_kernels::{Backend, DType, HostTensor};

/// Deterministic values in [-1, 1).
pub fn values(len: usize, seed: u32) -> impl Iterator<Item = f32> {
    (0..len).map(move |i| {
        let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
        (h % 2048) as f32 / 1024.0 - 1.0
    })
}

/// An `[n, k]` bf16 weight of [`values`], uploaded to the CPU backend.
pub fn bf16_weight(b: &CpuBackend, n: usize, k: usize, seed: u32) -> CpuWeight {
    let bytes: Vec<u8> = values(n * k, seed)
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let host = HostTensor::from_bytes(&bytes, DType::BF16, vec![n, k]).expect("weight");
    b.upload_weight(host).expect("upload")
}

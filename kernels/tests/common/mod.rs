//! Helpers shared by the CUDA test binaries: opening the device (or skipping visibly), random
//! inputs, weights in any dtype, and the relative-error comparison.
#![allow(dead_code)] // each test binary uses its own subset

pub mod heads;

use half::{bf16, f16};
use tessera_kernels::cuda::CudaBackend;
use tessera_kernels::{BackendError, DType, HostTensor, RopeLayout, RopeTable, SeqMeta, StepMeta};

/// Device 0, or `None` after printing why the test is skipped.
pub fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(BackendError::CudaNotAvailable(reason)) => {
            eprintln!("SKIPPED: {test}: {reason}");
            None
        }
        Err(e) => panic!("{test}: opening the GPU failed: {e}"),
    }
}

/// Deterministic values in [-1, 1) (SplitMix64).
pub fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Values rounded to bf16 and back (what a bf16 cache stores exactly).
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect()
}

pub fn weight(values: Vec<f32>, shape: Vec<usize>, dtype: DType) -> HostTensor {
    let bytes: Vec<u8> = match dtype {
        DType::F32 => return HostTensor::from_f32(values, shape).unwrap(),
        DType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    };
    HostTensor::from_bytes(&bytes, dtype, shape).unwrap()
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold(
            (0, 0.0f32),
            |acc, (i, e)| if e > acc.1 { (i, e) } else { acc },
        );
    assert!(
        err / scale <= tol && got.iter().all(|v| v.is_finite()),
        "{what}: max error {err} at {i} (got {}, want {}), scale {scale}, tolerance {tol}",
        got[i],
        want[i]
    );
}

/// One sequence prefilling `ids` (block size 8).
pub fn ids_meta(ids: &[u32]) -> StepMeta {
    let n = ids.len();
    StepMeta {
        seqs: vec![SeqMeta {
            token_start: 0,
            num_tokens: n,
            context_len: n,
            block_table: (0..n.div_ceil(8) as u32).collect(),
        }],
        block_size: 8,
        tokens: ids.to_vec(),
    }
}

/// A RoPE table of `half` frequencies with base 10000.
pub fn rope_table(layout: RopeLayout, half: usize, scaling: f32) -> RopeTable {
    RopeTable {
        inv_freq: (0..half)
            .map(|i| 10000f32.powf(-(2.0 * i as f32) / (2 * half) as f32))
            .collect(),
        attention_scaling: scaling,
        layout,
    }
}

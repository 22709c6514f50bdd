//! The head layout of an attention case, shared by the attention tests of `cuda.rs` and
//! `cuda_prefill.rs`.

use tessera_kernels::{AttentionParams, Backend, KvSpec, KvValues, Result};

use super::{bf16_round, rand_vec};

/// Head layout of an attention case.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub qk: usize,
    pub vd: usize,
    pub values: KvValues,
}

impl Heads {
    pub const fn new(heads: usize, kv_heads: usize, qk: usize, vd: usize) -> Self {
        Heads {
            heads,
            kv_heads,
            qk,
            vd,
            values: KvValues::Separate,
        }
    }

    /// MLA's latent cache: every query head on one KV head whose values are the first `vd`
    /// elements of its keys.
    pub const fn latent(heads: usize, qk: usize, vd: usize) -> Self {
        Heads {
            heads,
            kv_heads: 1,
            qk,
            vd,
            values: KvValues::KeyPrefix,
        }
    }

    pub fn kv_spec(self, num_blocks: usize, block_size: usize) -> KvSpec {
        KvSpec {
            num_blocks,
            block_size,
            num_kv_heads: self.kv_heads,
            k_dim: self.qk,
            v_dim: self.vd,
            values: self.values,
        }
    }

    /// Random keys and values for `n` tokens (bf16-representable, so that the GPU's bf16 cache
    /// holds them exactly), written into `cache`; no values for a latent cache.
    pub fn write<B: Backend>(
        self,
        b: &B,
        cache: &mut B::KvLayer,
        step: &B::Step,
        (n, seed): (usize, u64),
    ) -> Result<()> {
        let (kw, vw) = (self.kv_heads * self.qk, self.kv_heads * self.vd);
        let k = b.tensor_from_host(bf16_round(&rand_vec(n * kw, seed)), n, kw)?;
        let v = b.tensor_from_host(bf16_round(&rand_vec(n * vw, seed + 1)), n, vw)?;
        let v = (self.values == KvValues::Separate).then_some(&v);
        b.write_kv(cache, &k, v, step)
    }

    pub fn params(self, window: Option<usize>) -> AttentionParams {
        AttentionParams {
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            qk_dim: self.qk,
            v_dim: self.vd,
            scale: 1.0 / (self.qk as f32).sqrt(),
            sliding_window: window,
        }
    }
}

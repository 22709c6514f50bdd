//! The paged KV cache: per-layer block storage on the backend and a free list of block ids.
//!
//! Sequences own lists of block ids (their block tables); the backend's attention reads keys and
//! values through those tables, so sequences of any length share one pool without copying.

use tessera_kernels::{Backend, KvSpec};

use crate::WorkerError;

pub struct KvCache<B: Backend> {
    pub layers: Vec<B::KvLayer>,
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
}

impl<B: Backend> KvCache<B> {
    /// Allocates `num_blocks` blocks of `block_size` positions for every layer spec given.
    pub fn new(backend: &B, specs: Vec<KvSpec>) -> Result<Self, WorkerError> {
        let (num_blocks, block_size) = specs
            .first()
            .map_or((0, 1), |s| (s.num_blocks, s.block_size));
        let layers = specs
            .into_iter()
            .map(|s| backend.alloc_kv(s))
            .collect::<Result<_, _>>()?;
        Ok(KvCache {
            layers,
            block_size,
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Takes `n` free blocks, or fails without taking any.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, WorkerError> {
        if n > self.free.len() {
            return Err(WorkerError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::cpu::CpuBackend;

    #[test]
    fn allocation_is_all_or_nothing_and_release_returns_blocks() {
        let spec = KvSpec {
            num_blocks: 4,
            block_size: 16,
            num_kv_heads: 1,
            k_dim: 2,
            v_dim: 2,
        };
        let mut cache = KvCache::new(&CpuBackend, vec![spec; 2]).unwrap();
        assert_eq!(cache.blocks_for(17), 2);
        let a = cache.allocate(3).unwrap();
        assert!(matches!(
            cache.allocate(2),
            Err(WorkerError::OutOfBlocks { needed: 2, free: 1 })
        ));
        assert_eq!(cache.num_free(), 1);
        cache.release(a);
        assert_eq!(cache.num_free(), 4);
    }
}
